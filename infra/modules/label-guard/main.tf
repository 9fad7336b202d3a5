# Ringfence label guard: only the tagging principals may write the tag keys that carry labels
# (the policy's labels.key_prefix), and only the named administrators may create or change the
# tagging roles themselves. One statement set, used twice: a service control policy for
# the given OUs/accounts (apply in the Organizations management account or a delegated
# administrator), and a deny-only managed policy to attach, or copy into a permission boundary,
# where there is no organization. See docs/deploy-aws.md, "Guard the label keys".

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40"
    }
  }
}

variable "label_key_prefix" {
  description = "The policy's labels.key_prefix: tag keys starting with it carry labels."
  type        = string
  default     = "ringfence:"
}

variable "tagger_principal_arns" {
  description = "Principal ARNs (patterns allowed) that may write label keys; list the same in the policy's labels.taggers."
  type        = list(string)

  validation {
    condition     = length(var.tagger_principal_arns) > 0
    error_message = "Name at least one tagging principal."
  }
}

variable "perimeter_principal_arns" {
  description = "The perimeter's roles (patterns allowed): the member accounts' perimeter role and the control account's perimeter function role. They may tag a security group with ringfence:perimeter (and Name) in the CreateSecurityGroup call that makes it, and no other label key, anywhere else."
  type        = list(string)
  default     = ["arn:aws:iam::*:role/ringfence-member-perimeter"]
}

variable "tagger_role_admin_arns" {
  description = "Principal ARNs that alone may create, change, delete or pass the tagging roles and the perimeter's roles (tagger_principal_arns, perimeter_principal_arns: their trust and permissions), e.g. AWSControlTowerExecution, or another role your landing zone already guards; where the guard applies to the control account, the principal that deploys Ringfence too. A pattern with * for the account trusts a role of that name in every account: this keeps anyone else from making one."
  type        = list(string)

  validation {
    condition     = length(var.tagger_role_admin_arns) > 0
    error_message = "Name at least one principal that administers the tagging roles."
  }
}

variable "scp_target_ids" {
  description = "OU ids, account ids or the root id to attach the SCP to; empty creates no SCP."
  type        = list(string)
  default     = []
}

variable "name" {
  description = "Name of the SCP and of the managed policy."
  type        = string
  default     = "ringfence-label-guard"
}

locals {
  condition = {
    keys       = ["${var.label_key_prefix}*"]
    principals = var.tagger_principal_arns
  }
  # an empty string names no principal (as PerimeterPrincipalArns "" in the CloudFormation guard):
  # left in, it would be an empty principal and an empty Resource ARN
  perimeter_principals = compact(var.perimeter_principal_arns)
  ec2_actions = [
    "ec2:DeleteTags",
    "ec2:RunInstances",
    "ec2:CreateFleet",
    "ec2:RequestSpotInstances",
  ]
  asg_actions = [
    "autoscaling:CreateAutoScalingGroup",
    "autoscaling:CreateOrUpdateTags",
    "autoscaling:DeleteTags",
  ]
  # who a tagging role is, and who may assume it, is as sensitive as the label keys themselves
  role_actions = [
    "iam:CreateRole",
    "iam:DeleteRole",
    "iam:UpdateRole",
    "iam:UpdateAssumeRolePolicy",
    "iam:PutRolePolicy",
    "iam:DeleteRolePolicy",
    "iam:AttachRolePolicy",
    "iam:DetachRolePolicy",
    "iam:PutRolePermissionsBoundary",
    "iam:DeleteRolePermissionsBoundary",
    "iam:TagRole",
    "iam:UntagRole",
    "iam:PassRole", # handing it to a service (a build, a function) runs code as it
  ]
}

data "aws_iam_policy_document" "guard" {
  statement {
    sid       = "DenyLabelTagWrites"
    effect    = "Deny"
    actions   = concat(local.ec2_actions, local.asg_actions)
    resources = ["*"]
    condition {
      test     = "ForAnyValue:StringLike"
      variable = "aws:TagKeys"
      values   = local.condition.keys
    }
    condition {
      test     = "ArnNotLike"
      variable = "aws:PrincipalArn"
      values   = local.condition.principals
    }
  }
  # tag-on-create is authorized as ec2:CreateTags: everyone but the taggers and the perimeter's
  # roles is refused every label key, the perimeter's roles all but ringfence:perimeter (and
  # Name) on the groups they create
  statement {
    sid       = "DenyLabelTagCreation"
    effect    = "Deny"
    actions   = ["ec2:CreateTags"]
    resources = ["*"]
    condition {
      test     = "ForAnyValue:StringLike"
      variable = "aws:TagKeys"
      values   = local.condition.keys
    }
    condition {
      test     = "ArnNotLike"
      variable = "aws:PrincipalArn"
      values   = concat(local.condition.principals, local.perimeter_principals)
    }
  }
  statement {
    sid       = "DenyPerimeterTagsButOnItsNewGroups"
    effect    = "Deny"
    actions   = ["ec2:CreateTags"]
    resources = ["*"]
    condition {
      test     = "ForAnyValue:StringLike"
      variable = "aws:TagKeys"
      values   = local.condition.keys
    }
    condition {
      test     = "ArnNotLike"
      variable = "aws:PrincipalArn"
      values   = local.condition.principals
    }
    condition {
      test     = "StringNotEquals"
      variable = "ec2:CreateAction"
      values   = ["CreateSecurityGroup"]
    }
  }
  statement {
    sid       = "DenyPerimeterOtherLabelKeys"
    effect    = "Deny"
    actions   = ["ec2:CreateTags"]
    resources = ["*"]
    condition {
      test     = "ForAnyValue:StringLike"
      variable = "aws:TagKeys"
      values   = local.condition.keys
    }
    condition {
      test     = "ArnNotLike"
      variable = "aws:PrincipalArn"
      values   = local.condition.principals
    }
    condition {
      test     = "ForAnyValue:StringNotEquals"
      variable = "aws:TagKeys"
      values   = ["ringfence:perimeter", "Name"]
    }
  }
  statement {
    # the perimeter's roles too: the guard trusts them with ringfence:perimeter on new groups
    sid       = "DenyTaggerRoleChanges"
    effect    = "Deny"
    actions   = local.role_actions
    resources = concat(var.tagger_principal_arns, local.perimeter_principals)
    condition {
      test     = "ArnNotLike"
      variable = "aws:PrincipalArn"
      values   = var.tagger_role_admin_arns
    }
  }
}

resource "aws_organizations_policy" "guard" {
  count       = length(var.scp_target_ids) > 0 ? 1 : 0
  name        = var.name
  description = "Only the Ringfence tagging principals may write Ringfence label tag keys"
  type        = "SERVICE_CONTROL_POLICY"
  content     = data.aws_iam_policy_document.guard.json
}

resource "aws_organizations_policy_attachment" "guard" {
  for_each  = length(var.scp_target_ids) > 0 ? toset(var.scp_target_ids) : toset([])
  policy_id = aws_organizations_policy.guard[0].id
  target_id = each.value
}

resource "aws_iam_policy" "guard" {
  name        = var.name
  description = "Deny writing Ringfence label tag keys (attach to everyone but the tagging principals)"
  policy      = data.aws_iam_policy_document.guard.json
}

output "policy_json" {
  description = "The guard's statements (for a permission boundary of your own)."
  value       = data.aws_iam_policy_document.guard.json
}

output "managed_policy_arn" {
  description = "The deny-only managed policy."
  value       = aws_iam_policy.guard.arn
}
