# Example: guard the label keys across two OUs (run with management-account credentials).
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
  region = "us-east-1"
}

module "label_guard" {
  source                 = "../../modules/label-guard"
  tagger_principal_arns  = ["arn:aws:iam::*:role/ringfence-tagging"]
  tagger_role_admin_arns = ["arn:aws:iam::*:role/AWSControlTowerExecution"]
  scp_target_ids         = ["ou-abcd-11111111", "ou-abcd-22222222"]
  # the member accounts' perimeter role and the control account's perimeter function role
  perimeter_principal_arns = ["arn:aws:iam::*:role/ringfence-member-perimeter", "arn:aws:iam::111122223333:role/ringfence-perimeter"]
}
