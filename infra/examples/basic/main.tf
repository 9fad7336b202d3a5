# Example root module: one control-plane account reconciling itself and one member account.
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

variable "region" {
  type    = string
  default = "ca-central-1"
}

variable "signing_key_secret_arn" {
  type = string
}

variable "member_account" {
  type    = string
  default = "222233334444"
}

module "ringfence" {
  source                 = "../../modules/ringfence"
  name                   = "ringfence"
  signing_key_secret_arn = var.signing_key_secret_arn
  core_layer_zip         = "${path.root}/../../../build/core-layer.zip"
  iid_certificate        = file("${path.root}/aws-iid-${var.region}.pem")
  reconcile_targets = [
    { account = "111122223333", region = var.region, role_arn = null },
    { account = var.member_account, region = var.region, role_arn = "arn:aws:iam::${var.member_account}:role/ringfence-member-readonly" },
  ]
  account_roles = {
    (var.member_account) = "arn:aws:iam::${var.member_account}:role/ringfence-member-readonly"
  }
  perimeter_config = {
    admin_cidrs         = ["10.99.0.0/24"]
    control_plane_cidrs = ["10.200.0.0/24"]
    published           = [{ name = "web", match = { role = "lb" }, ports = ["tcp/443"] }]
  }
  perimeter_dry_run = true
  tags              = { project = "ringfence" }
}

output "agent_api_url" {
  value = module.ringfence.agent_api_url
}
