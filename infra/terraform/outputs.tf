output "input_bucket" {
  description = "BIREFNET_INPUT_BUCKET"
  value       = aws_s3_bucket.input.bucket
}

output "output_bucket" {
  description = "BIREFNET_OUTPUT_BUCKET"
  value       = aws_s3_bucket.output.bucket
}

output "sqs_queue_url" {
  description = "BIREFNET_SQS_QUEUE_URL"
  value       = aws_sqs_queue.events.url
}

output "sqs_queue_arn" {
  description = "ARN of the queue receiving the input bucket's ObjectCreated events."
  value       = aws_sqs_queue.events.arn
}

output "sqs_dead_letter_queue_url" {
  description = "Events the producer failed on; inspect and redrive from here."
  value       = aws_sqs_queue.events_dlq.url
}

output "gateway_role_arn" {
  description = "IAM role for the gateway (eks.amazonaws.com/role-arn of its service account)."
  value       = aws_iam_role.gateway.arn
}

output "producer_role_arn" {
  description = "IAM role for the producer (eks.amazonaws.com/role-arn of its service account)."
  value       = aws_iam_role.producer.arn
}

output "worker_role_arn" {
  description = "IAM role for the GPU workers (eks.amazonaws.com/role-arn of their service account)."
  value       = aws_iam_role.worker.arn
}

output "service_env" {
  description = "Settings for the ConfigMap (infra/k8s) or an .env file."
  value = {
    BIREFNET_AWS_REGION    = var.aws_region
    BIREFNET_INPUT_BUCKET  = aws_s3_bucket.input.bucket
    BIREFNET_OUTPUT_BUCKET = aws_s3_bucket.output.bucket
    BIREFNET_OUTPUT_PREFIX = var.output_prefix
    BIREFNET_SQS_QUEUE_URL = aws_sqs_queue.events.url
  }
}

output "instance_profile_names" {
  description = "EC2 instance profiles of the roles (empty with IRSA): launch the hosts with these."
  value       = { for component, profile in aws_iam_instance_profile.component : component => profile.name }
}

output "aws_account_id" {
  description = "Account the resources live in (ECR registry of the images: <id>.dkr.ecr.<region>.amazonaws.com)."
  value       = data.aws_caller_identity.current.account_id
}

output "aws_region" {
  description = "BIREFNET_AWS_REGION"
  value       = var.aws_region
}
