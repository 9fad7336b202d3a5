# Example root module: the control plane in one account, reconciling that account and any member
# accounts. Every input is in variables.tf; terraform.tfvars.example shows a filled-in set, and
# README.md walks through the prerequisites (signing key, IID certificate, layer zip).
terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40"
    }
  }
}

provider "aws" {
  region = var.region
}

# plan fails early when the credentials are not those of the account named as control_account
data "aws_caller_identity" "current" {
  lifecycle {
    postcondition {
      condition     = self.account_id == var.control_account
      error_message = "The AWS credentials are for account ${self.account_id}, not control_account ${var.control_account}."
    }
  }
}

locals {
  member_role_arns = {
    for account in var.member_accounts : account => "arn:aws:iam::${account}:role/${var.member_role_name}"
  }
  # the perimeter's own role in each member account (security-group writes), apart from the read-only one
  member_perimeter_role_arns = {
    for account in var.member_accounts : account => "arn:aws:iam::${account}:role/${var.member_perimeter_role_name}"
  }
  # the Region's RSA certificate for the base64 IID signature (README.md, step 2)
  iid_certificate_file = coalesce(var.iid_certificate_file, "${path.root}/aws-iid-${var.region}.pem")
}

module "ringfence" {
  source                 = "../../modules/ringfence"
  name                   = var.name
  signing_key_source     = var.signing_key_source
  signing_key_secret_arn = var.signing_key_secret_arn
  signing_kms_keys       = var.signing_kms_keys
  active_signing_kms_key = var.active_signing_kms_key
  core_layer_zip         = coalesce(var.core_layer_zip, "${path.root}/../../../build/core-layer.zip")
  iid_certificate        = file(local.iid_certificate_file)
  # only instances of our own accounts may enroll
  allowed_accounts = concat([var.control_account], var.member_accounts)
  # the control account is read with the functions' own role (role_arn null), members through theirs
  reconcile_targets = concat(
    [{ account = var.control_account, region = var.region, role_arn = null }],
    [for account, arn in local.member_role_arns : { account = account, region = var.region, role_arn = arn }],
  )
  account_roles              = local.member_role_arns
  admin_roles                = var.admin_roles
  member_role_name           = var.member_role_name
  perimeter_account_roles    = local.member_perimeter_role_arns
  member_perimeter_role_name = var.member_perimeter_role_name
  perimeter_config = {
    admin_cidrs         = var.admin_cidrs
    control_plane_cidrs = var.control_plane_cidrs
    published           = var.published_services
  }
  perimeter_dry_run  = var.perimeter_dry_run
  log_retention_days = var.log_retention_days
  tags               = var.tags
}
