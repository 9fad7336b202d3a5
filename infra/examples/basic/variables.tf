variable "region" {
  description = "Region of the control plane and of the instances it reconciles."
  type        = string
  default     = "ca-central-1"
}

variable "name" {
  description = "Name prefix for every resource."
  type        = string
  default     = "ringfence"
}

variable "control_account" {
  description = "Id of the account this stack is deployed into (the control-plane account); its instances are reconciled and may enroll."
  type        = string

  validation {
    condition     = can(regex("^[0-9]{12}$", var.control_account))
    error_message = "control_account must be a 12-digit AWS account id."
  }
}

variable "member_accounts" {
  description = "Other accounts whose instances Ringfence segments; each needs the member role (README.md, step 5)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.member_accounts : can(regex("^[0-9]{12}$", a))])
    error_message = "member_accounts must be 12-digit AWS account ids."
  }
}

variable "member_role_name" {
  description = "Name of the read-only role in every member account."
  type        = string
  default     = "ringfence-member-readonly"
}

variable "member_perimeter_role_name" {
  description = "Name of the perimeter's role in every member account (security-group writes; only the perimeter function may assume it)."
  type        = string
  default     = "ringfence-member-perimeter"
}

variable "signing_key_source" {
  description = "kms (default: a non-exportable Ed25519 KMS key the module creates) or secret (signing_key_secret_arn)."
  type        = string
  default     = "kms"
}

variable "signing_key_secret_arn" {
  description = "With signing_key_source = secret: the Secrets Manager secret holding the Ed25519 bundle signing key (PKCS#8 PEM)."
  type        = string
  default     = ""
}

variable "signing_kms_keys" {
  description = "With signing_key_source = kms: the signing-key slots that hold a key (rotation: docs/bundle.md, Keys and rotation)."
  type        = set(string)
  default     = ["a"]
}

variable "active_signing_kms_key" {
  description = "With signing_key_source = kms: the slot compute and publish sign with."
  type        = string
  default     = "a"
}

variable "iid_certificate_file" {
  description = "PEM file of the Region's RSA certificate for the base64 instance identity document signature (default: aws-iid-<region>.pem beside this file)."
  type        = string
  default     = null
}

variable "core_layer_zip" {
  description = "The core layer zip built by infra/build-layer.sh (default: build/core-layer.zip of this checkout)."
  type        = string
  default     = null
}

variable "admin_cidrs" {
  description = "Ranges allowed to the admin ports (SSH/RDP) by the perimeter's management group."
  type        = list(string)
  default     = []
}

variable "control_plane_cidrs" {
  description = "Ranges of the control-plane endpoint agents call (HTTPS egress in the management group)."
  type        = list(string)
  default     = []
}

variable "published_services" {
  description = "Internet ingress the perimeter opens: workloads whose labels match, on these ports."
  type = list(object({
    name  = string
    match = map(string)
    ports = list(string)
  }))
  default = []
}

variable "perimeter_dry_run" {
  description = "true: the perimeter function reports its plans and changes no security group."
  type        = bool
  default     = true
}

variable "log_retention_days" {
  description = "Retention of the functions' log groups."
  type        = number
  default     = 365
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default     = { project = "ringfence" }
}

variable "admin_roles" {
  description = "IAM role ARN → admin roles (policy-author, incident-responder, onboarding, reader): who may call the admin API, and for what."
  type        = map(list(string))
}
