variable "aws_region" {
  description = "AWS region for the buckets and the queue (BIREFNET_AWS_REGION)."
  type        = string
  default     = "us-east-1"
}

variable "name" {
  description = "Name prefix of the queue, dead-letter queue and IAM roles."
  type        = string
  default     = "birefnet"
}

variable "input_bucket_name" {
  description = "Globally unique name of the input bucket: uploads here become jobs (BIREFNET_INPUT_BUCKET)."
  type        = string
}

variable "output_bucket_name" {
  description = "Globally unique name of the output bucket for cut-outs, masks and result documents (BIREFNET_OUTPUT_BUCKET)."
  type        = string
}

variable "output_prefix" {
  description = "Key prefix of everything the service writes to the output bucket (BIREFNET_OUTPUT_PREFIX)."
  type        = string
  default     = "results/"
}

variable "output_expiration_days" {
  description = "Days after which objects under output_prefix expire. 0 keeps results forever."
  type        = number
  default     = 30

  validation {
    condition     = var.output_expiration_days >= 0 && floor(var.output_expiration_days) == var.output_expiration_days
    error_message = "output_expiration_days must be a whole number >= 0."
  }
}

variable "input_expiration_days" {
  description = "Days after which uploaded inputs expire. 0 keeps them forever."
  type        = number
  default     = 0

  validation {
    condition     = var.input_expiration_days >= 0 && floor(var.input_expiration_days) == var.input_expiration_days
    error_message = "input_expiration_days must be a whole number >= 0."
  }
}

variable "notification_filter_suffixes" {
  description = "Only keys ending with one of these suffixes notify the queue (S3 matches case-sensitively). Empty: every new object is sent and the producer filters by BIREFNET_IMAGE_SUFFIXES."
  type        = list(string)
  default     = []
}

variable "notification_filter_prefix" {
  description = "Only keys under this prefix notify the queue. Empty: the whole bucket."
  type        = string
  default     = ""
}

variable "kms_key_arn" {
  description = "KMS key for bucket encryption (SSE-KMS). Empty: SSE-S3 (AES256)."
  type        = string
  default     = ""
}

variable "queue_visibility_timeout_seconds" {
  description = "SQS visibility timeout: how long a received event stays hidden while the producer turns it into a job."
  type        = number
  default     = 60
}

variable "queue_max_receive_count" {
  description = "Receives of one event message before SQS moves it to the dead-letter queue."
  type        = number
  default     = 5
}

variable "dlq_message_retention_seconds" {
  description = "How long failed event messages stay in the dead-letter queue (max 14 days)."
  type        = number
  default     = 1209600
}

variable "eks_oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider, to trust the Kubernetes service accounts (IRSA). Empty: the roles trust EC2 instead (e.g. a docker compose host with an instance profile)."
  type        = string
  default     = ""
}

variable "k8s_namespace" {
  description = "Namespace of the Kubernetes deployment (infra/k8s)."
  type        = string
  default     = "birefnet"
}

variable "gateway_service_account" {
  description = "Kubernetes service account of the gateway (IRSA)."
  type        = string
  default     = "birefnet-gateway"
}

variable "producer_service_account" {
  description = "Kubernetes service account of the producer (IRSA)."
  type        = string
  default     = "birefnet-producer"
}

variable "worker_service_account" {
  description = "Kubernetes service account of the GPU workers (IRSA)."
  type        = string
  default     = "birefnet-worker"
}

variable "worker_extra_read_arns" {
  description = "More S3 object ARNs the workers may read, e.g. \"arn:aws:s3:::my-models/*\" for s3:// weights (BIREFNET_VARIANT_OVERRIDES) or buckets that API keys' s3_read allows as image_url."
  type        = list(string)
  default     = []
}

variable "force_destroy_buckets" {
  description = "Let `terraform destroy` delete non-empty buckets (test environments only)."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}
