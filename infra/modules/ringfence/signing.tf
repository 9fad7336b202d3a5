# --- the bundle signing key: only compute (set deltas) and publish (bundles) sign (docs/bundle.md) --
#
# signing_key_source = "kms" (default): a non-exportable KMS key, ECC_NIST_EDWARDS25519, signing
# ED25519_SHA_512 over each document's ≤4 KiB manifest. Its key policy lets the compute and publish
# roles, and no one else, call kms:Sign (an explicit deny covers every other principal, account admins included).
# Every other key action, kms:PutKeyPolicy included, stays with the account's IAM: a principal IAM
# allows kms:PutKeyPolicy on this key can rewrite the policy and sign (docs/deploy-aws.md, hardening
# checklist item 1; docs/threat-model.md, out of scope).
# signing_key_source = "secret": the Ed25519 PEM in the Secrets Manager secret signing_key_secret_arn,
# with a resource policy that denies reading it to everyone but the compute and publish roles.

locals {
  signing_kms    = var.signing_key_source == "kms"
  compute_role   = "arn:${local.partition}:iam::${local.account}:role/${var.name}-compute"
  publish_role   = "arn:${local.partition}:iam::${local.account}:role/${var.name}-publish"
  signing_key_id = local.signing_kms ? "kms-sign:${aws_kms_key.signing[var.active_signing_kms_key].arn}" : "secretsmanager:${var.signing_key_secret_arn}"
}

# two slots, a and b, so that a key can be replaced without a moment unsigned (docs/bundle.md)
resource "terraform_data" "active_signing_key_kept" {
  count = local.signing_kms ? 1 : 0
  lifecycle {
    precondition {
      condition     = contains(var.signing_kms_keys, var.active_signing_kms_key)
      error_message = "active_signing_kms_key (${var.active_signing_kms_key}) must be one of signing_kms_keys: keep both while switching."
    }
  }
}

data "aws_iam_policy_document" "signing_key" {
  #checkov:skip=CKV_AWS_111:in a key policy "*" means this key only
  #checkov:skip=CKV_AWS_356:in a key policy "*" means this key only
  #checkov:skip=CKV_AWS_109:in a key policy "*" means this key only; the account root administers it
  #checkov:skip=CKV_AWS_107:a key policy; the root statement delegates this key to the account's IAM (NotAction kms:Sign), it grants no credentials
  #checkov:skip=CKV_AWS_108:a key policy; the root statement administers this key (NotAction kms:Sign), it reads no data
  #checkov:skip=CKV_AWS_110:a key policy on this key only, no IAM rights; kms:PutKeyPolicy stays with the account's IAM (whoever holds it can grant signing: docs/deploy-aws.md)
  statement {
    sid         = "AccountAdministersButDoesNotSign"
    not_actions = ["kms:Sign"]
    resources   = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account}:root"]
    }
  }
  statement {
    sid       = "OnlyComputeAndPublishSign"
    actions   = ["kms:Sign", "kms:GetPublicKey", "kms:DescribeKey"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = [aws_iam_role.fn["compute"].arn, aws_iam_role.fn["publish"].arn]
    }
  }
  statement {
    sid       = "NoOneElseSigns"
    effect    = "Deny"
    actions   = ["kms:Sign"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["*"]
    }
    condition {
      test     = "ArnNotEquals"
      variable = "aws:PrincipalArn"
      values   = [local.compute_role, local.publish_role]
    }
  }
}

resource "aws_kms_key" "signing" {
  for_each                 = local.signing_kms ? var.signing_kms_keys : toset([])
  description              = "${var.name} bundle signing key ${each.key} (Ed25519, non-exportable; kms:Sign for the compute and publish roles only)"
  customer_master_key_spec = "ECC_NIST_EDWARDS25519"
  key_usage                = "SIGN_VERIFY"
  policy                   = data.aws_iam_policy_document.signing_key.json
  tags                     = var.tags
}

moved { # the single key of earlier versions is slot a
  from = aws_kms_key.signing[0]
  to   = aws_kms_key.signing["a"]
}

data "aws_iam_policy_document" "signing_secret" {
  statement {
    sid       = "OnlyComputeAndPublishReadTheSigningKey"
    effect    = "Deny"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["*"]
    }
    condition {
      test     = "ArnNotEquals"
      variable = "aws:PrincipalArn"
      values   = [local.compute_role, local.publish_role]
    }
  }
}

resource "aws_secretsmanager_secret_policy" "signing" {
  count      = local.signing_kms ? 0 : 1
  secret_arn = var.signing_key_secret_arn
  policy     = data.aws_iam_policy_document.signing_secret.json
  # as SAM's BlockPublicPolicy: Secrets Manager refuses a policy that would open the secret to the world
  block_public_policy = true
}
