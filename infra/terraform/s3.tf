locals {
  buckets = {
    input  = aws_s3_bucket.input
    output = aws_s3_bucket.output
  }
}

resource "aws_s3_bucket" "input" {
  bucket        = var.input_bucket_name
  force_destroy = var.force_destroy_buckets
}

resource "aws_s3_bucket" "output" {
  bucket        = var.output_bucket_name
  force_destroy = var.force_destroy_buckets
}

resource "aws_s3_bucket_public_access_block" "this" {
  for_each = local.buckets

  bucket                  = each.value.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "this" {
  for_each = local.buckets

  bucket = each.value.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  for_each = local.buckets

  bucket = each.value.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.kms_key_arn == "" ? "AES256" : "aws:kms"
      kms_master_key_id = var.kms_key_arn == "" ? null : var.kms_key_arn
    }
    bucket_key_enabled = var.kms_key_arn != ""
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "output" {
  bucket = aws_s3_bucket.output.id

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  dynamic "rule" {
    for_each = var.output_expiration_days > 0 ? [var.output_expiration_days] : []

    content {
      id     = "expire-results"
      status = "Enabled"

      filter {
        prefix = var.output_prefix
      }

      expiration {
        days = rule.value
      }
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "input" {
  bucket = aws_s3_bucket.input.id

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  dynamic "rule" {
    for_each = var.input_expiration_days > 0 ? [var.input_expiration_days] : []

    content {
      id     = "expire-inputs"
      status = "Enabled"

      filter {}

      expiration {
        days = rule.value
      }
    }
  }
}

# Every new object in the input bucket (any s3:ObjectCreated:* event) becomes an SQS message
# that the producer (`python -m producer sqs`) turns into a job. One queue block per suffix
# filter; without filters, one block for the whole bucket.
resource "aws_s3_bucket_notification" "input" {
  bucket = aws_s3_bucket.input.id

  dynamic "queue" {
    for_each = length(var.notification_filter_suffixes) > 0 ? var.notification_filter_suffixes : [""]

    content {
      id            = queue.value == "" ? "birefnet-jobs" : "birefnet-jobs${replace(queue.value, ".", "-")}"
      queue_arn     = aws_sqs_queue.events.arn
      events        = ["s3:ObjectCreated:*"]
      filter_prefix = var.notification_filter_prefix == "" ? null : var.notification_filter_prefix
      filter_suffix = queue.value == "" ? null : queue.value
    }
  }

  # S3 checks that it may send to the queue when the notification is created.
  depends_on = [aws_sqs_queue_policy.events]
}
