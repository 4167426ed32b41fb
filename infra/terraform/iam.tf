locals {
  use_irsa = var.eks_oidc_provider_arn != ""
  # "oidc.eks.<region>.amazonaws.com/id/<id>" from the provider ARN.
  oidc_issuer = local.use_irsa ? element(split(":oidc-provider/", var.eks_oidc_provider_arn), 1) : ""

  service_accounts = {
    gateway  = var.gateway_service_account
    producer = var.producer_service_account
    worker   = var.worker_service_account
  }
}

# Who may assume each role: the component's Kubernetes service account (IRSA), else EC2.
data "aws_iam_policy_document" "assume" {
  for_each = local.service_accounts

  dynamic "statement" {
    for_each = local.use_irsa ? [each.value] : []

    content {
      effect  = "Allow"
      actions = ["sts:AssumeRoleWithWebIdentity"]

      principals {
        type        = "Federated"
        identifiers = [var.eks_oidc_provider_arn]
      }

      condition {
        test     = "StringEquals"
        variable = "${local.oidc_issuer}:sub"
        values   = ["system:serviceaccount:${var.k8s_namespace}:${statement.value}"]
      }

      condition {
        test     = "StringEquals"
        variable = "${local.oidc_issuer}:aud"
        values   = ["sts.amazonaws.com"]
      }
    }
  }

  dynamic "statement" {
    for_each = local.use_irsa ? [] : [each.key]

    content {
      effect  = "Allow"
      actions = ["sts:AssumeRole"]

      principals {
        type        = "Service"
        identifiers = ["ec2.amazonaws.com"]
      }
    }
  }
}

# Producer: consumes the input bucket's events, reads (GET/HEAD) the uploaded objects and
# writes error documents for inputs it rejects.
data "aws_iam_policy_document" "producer" {
  statement {
    sid    = "ConsumeInputEvents"
    effect = "Allow"
    actions = [
      "sqs:ReceiveMessage",
      "sqs:DeleteMessage",
      "sqs:ChangeMessageVisibility",
      "sqs:GetQueueAttributes",
      "sqs:GetQueueUrl",
    ]
    resources = [aws_sqs_queue.events.arn]
  }

  statement {
    sid       = "ReadInputs"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"] # also HeadObject (with a VersionId: versioned buckets)
    resources = ["${aws_s3_bucket.input.arn}/*"]
  }

  statement {
    # Without ListBucket a missing key answers 403 instead of 404.
    sid       = "ListInputs"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.input.arn]
  }

  statement {
    sid       = "WriteErrorDocuments"
    effect    = "Allow"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.output.arn}/${var.output_prefix}*"]
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == "" ? [] : [var.kms_key_arn]

    content {
      sid       = "UseBucketKey"
      effect    = "Allow"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]
    }
  }
}

# Gateway (fal-compatible API): API uploads and outputs live under the output prefix; it presigns
# GET/PUT URLs for them and deletes them when their retention ends.
data "aws_iam_policy_document" "gateway" {
  statement {
    sid       = "ApiFiles"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${aws_s3_bucket.output.arn}/${var.output_prefix}*"]
  }

  statement {
    sid       = "ListApiFiles"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.output.arn]
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == "" ? [] : [var.kms_key_arn]

    content {
      sid       = "UseBucketKey"
      effect    = "Allow"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]
    }
  }
}

# Workers: read inputs, write and read results. No SQS access (jobs come through Redis).
data "aws_iam_policy_document" "worker" {
  statement {
    sid       = "ReadInputs"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"] # jobs from versioned buckets read one version
    resources = ["${aws_s3_bucket.input.arn}/*"]
  }

  statement {
    sid       = "ListInputs"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.input.arn]
  }

  statement {
    sid       = "ReadWriteResults"
    effect    = "Allow"
    actions   = ["s3:PutObject", "s3:GetObject"]
    resources = ["${aws_s3_bucket.output.arn}/${var.output_prefix}*"]
  }

  statement {
    sid       = "ListResults"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.output.arn]
  }

  dynamic "statement" {
    for_each = length(var.worker_extra_read_arns) > 0 ? [var.worker_extra_read_arns] : []

    content {
      sid       = "ReadExtraObjects"
      effect    = "Allow"
      actions   = ["s3:GetObject"]
      resources = statement.value
    }
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == "" ? [] : [var.kms_key_arn]

    content {
      sid       = "UseBucketKey"
      effect    = "Allow"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_role" "gateway" {
  name               = "${var.name}-gateway"
  description        = "BiRefNet gateway: API uploads and output files."
  assume_role_policy = data.aws_iam_policy_document.assume["gateway"].json
}

resource "aws_iam_role_policy" "gateway" {
  name   = "${var.name}-gateway"
  role   = aws_iam_role.gateway.id
  policy = data.aws_iam_policy_document.gateway.json
}

resource "aws_iam_role" "producer" {
  name               = "${var.name}-producer"
  description        = "BiRefNet producer: input bucket events (SQS) to jobs."
  assume_role_policy = data.aws_iam_policy_document.assume["producer"].json
}

resource "aws_iam_role_policy" "producer" {
  name   = "${var.name}-producer"
  role   = aws_iam_role.producer.id
  policy = data.aws_iam_policy_document.producer.json
}

resource "aws_iam_role" "worker" {
  name               = "${var.name}-worker"
  description        = "BiRefNet GPU workers: read inputs, write results."
  assume_role_policy = data.aws_iam_policy_document.assume["worker"].json
}

resource "aws_iam_role_policy" "worker" {
  name   = "${var.name}-worker"
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.worker.json
}

# Without IRSA the roles are for EC2 hosts (compose or self-managed nodes): an instance profile per role,
# so an instance launched with it gets the role's credentials from the instance metadata service.
resource "aws_iam_instance_profile" "component" {
  for_each = local.use_irsa ? {} : {
    gateway  = aws_iam_role.gateway.name
    producer = aws_iam_role.producer.name
    worker   = aws_iam_role.worker.name
  }

  name = "${var.name}-${each.key}"
  role = each.value
}
