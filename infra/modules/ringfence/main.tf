data "aws_caller_identity" "this" {}
data "aws_region" "this" {}
data "aws_partition" "this" {}

locals {
  account       = data.aws_caller_identity.this.account_id
  region        = data.aws_region.this.name
  partition     = data.aws_partition.this.partition
  functions_dir = "${path.module}/../../../functions"
}

# --- encryption -----------------------------------------------------------------------------------

data "aws_iam_policy_document" "key" {
  #checkov:skip=CKV_AWS_111:in a key policy "*" means this key only
  #checkov:skip=CKV_AWS_356:in a key policy "*" means this key only
  #checkov:skip=CKV_AWS_109:in a key policy "*" means this key only; the account root administers it
  statement {
    sid       = "AccountAdmin"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account}:root"]
    }
  }
  statement {
    sid       = "ServicesThatDeliverToUs"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey*", "kms:Encrypt", "kms:DescribeKey"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["events.amazonaws.com", "cloudwatch.amazonaws.com", "logs.${local.region}.amazonaws.com"]
    }
  }
}

resource "aws_kms_key" "this" {
  description         = "${var.name} data key (S3, DynamoDB, SQS, SNS, Lambda environment, logs)"
  enable_key_rotation = true
  policy              = data.aws_iam_policy_document.key.json
  tags                = var.tags
}

# --- state ----------------------------------------------------------------------------------------

resource "aws_dynamodb_table" "inventory" {
  name         = "${var.name}-inventory"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "id"
  attribute {
    name = "id"
    type = "S"
  }
  point_in_time_recovery {
    enabled = true
  }
  server_side_encryption {
    enabled     = true
    kms_key_arn = aws_kms_key.this.arn
  }
  tags = var.tags
}

resource "aws_dynamodb_table" "state" {
  name         = "${var.name}-state"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "pk"
  range_key    = "sk"
  attribute {
    name = "pk"
    type = "S"
  }
  attribute {
    name = "sk"
    type = "S"
  }
  ttl {
    attribute_name = "ttl"
    enabled        = true
  }
  point_in_time_recovery {
    enabled = true
  }
  server_side_encryption {
    enabled     = true
    kms_key_arn = aws_kms_key.this.arn
  }
  tags = var.tags
}

resource "aws_dynamodb_table" "audit" {
  name                        = "${var.name}-audit"
  billing_mode                = "PAY_PER_REQUEST"
  hash_key                    = "pk"
  range_key                   = "sk"
  deletion_protection_enabled = true
  attribute {
    name = "pk"
    type = "S"
  }
  attribute {
    name = "sk"
    type = "S"
  }
  point_in_time_recovery {
    enabled = true
  }
  server_side_encryption {
    enabled     = true
    kms_key_arn = aws_kms_key.this.arn
  }
  tags = var.tags
}

resource "aws_dynamodb_table" "idempotency" {
  name         = "${var.name}-idempotency"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "id"
  attribute {
    name = "id"
    type = "S"
  }
  ttl {
    attribute_name = "expiration"
    enabled        = true
  }
  point_in_time_recovery {
    enabled = true
  }
  server_side_encryption {
    enabled     = true
    kms_key_arn = aws_kms_key.this.arn
  }
  tags = var.tags
}

# --- buckets --------------------------------------------------------------------------------------

resource "aws_s3_bucket" "bundles" {
  #checkov:skip=CKV_AWS_144:cross-region replication is a deployment choice; bundles are re-rendered from the inventory
  #checkov:skip=CKV2_AWS_62:notifications are on (aws_s3_bucket_notification.bundles, EventBridge: the flows function takes reports/); checkov does not link that resource
  bucket_prefix = "${var.name}-bundles-"
  tags          = var.tags
}

resource "aws_s3_bucket_versioning" "bundles" {
  bucket = aws_s3_bucket.bundles.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "bundles" {
  bucket = aws_s3_bucket.bundles.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.this.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_public_access_block" "bundles" {
  bucket                  = aws_s3_bucket.bundles.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "bundles" {
  bucket = aws_s3_bucket.bundles.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_logging" "bundles" {
  bucket        = aws_s3_bucket.bundles.id
  target_bucket = aws_s3_bucket.logs.id
  target_prefix = "bundles/"
}

resource "aws_s3_bucket_lifecycle_configuration" "bundles" {
  bucket = aws_s3_bucket.bundles.id
  rule {
    id     = "old-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = 30
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
  rule {
    id     = "reports"
    status = "Enabled"
    filter {
      prefix = "reports/"
    }
    expiration {
      days = 90
    }
  }
}

data "aws_iam_policy_document" "bundles_tls" {
  statement {
    sid       = "TlsOnly"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.bundles.arn, "${aws_s3_bucket.bundles.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
  # staged unsigned bundles (staging/, docs/deploy-aws.md): compute alone writes them, and
  # compute and the publish workers alone remove them. The worker signs only the bytes whose
  # SHA-256 compute put in the job; this keeps anyone else who may write the bucket from even
  # delaying a bundle by replacing or deleting its staged copy
  statement {
    sid       = "OnlyComputeStages"
    effect    = "Deny"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.bundles.arn}/staging/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "ArnNotEquals"
      variable = "aws:PrincipalArn"
      values   = [local.fn_role["compute"]]
    }
  }
  statement {
    sid       = "OnlyComputeAndPublishUnstage"
    effect    = "Deny"
    actions   = ["s3:DeleteObject", "s3:DeleteObjectVersion"]
    resources = ["${aws_s3_bucket.bundles.arn}/staging/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "ArnNotEquals"
      variable = "aws:PrincipalArn"
      values   = [local.fn_role["compute"], local.fn_role["publish"]]
    }
  }
}

resource "aws_s3_bucket_policy" "bundles" {
  bucket = aws_s3_bucket.bundles.id
  policy = data.aws_iam_policy_document.bundles_tls.json
}

# the audit chain's head, anchored outside the audit table's trust domain (docs/visibility.md):
# only the anchor function may write it, and Object Lock keeps every version it wrote
resource "aws_s3_bucket" "anchors" {
  #checkov:skip=CKV_AWS_144:cross-region replication is a deployment choice
  #checkov:skip=CKV2_AWS_62:nothing consumes its event notifications
  #checkov:skip=CKV2_AWS_61:no lifecycle: Object Lock keeps each anchor for its retention, and they stay after it
  bucket_prefix       = "${var.name}-audit-anchors-"
  object_lock_enabled = true
  tags                = var.tags
}

resource "aws_s3_bucket_versioning" "anchors" {
  bucket = aws_s3_bucket.anchors.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_object_lock_configuration" "anchors" {
  bucket = aws_s3_bucket.anchors.id
  rule {
    default_retention {
      mode = "COMPLIANCE"
      days = var.audit_anchor_retention_days
    }
  }
  depends_on = [aws_s3_bucket_versioning.anchors]
}

resource "aws_s3_bucket_server_side_encryption_configuration" "anchors" {
  bucket = aws_s3_bucket.anchors.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.this.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_public_access_block" "anchors" {
  bucket                  = aws_s3_bucket.anchors.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "anchors" {
  bucket = aws_s3_bucket.anchors.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_logging" "anchors" {
  bucket        = aws_s3_bucket.anchors.id
  target_bucket = aws_s3_bucket.logs.id
  target_prefix = "anchors/"
}

data "aws_iam_policy_document" "anchors_tls" {
  statement {
    sid       = "TlsOnly"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.anchors.arn, "${aws_s3_bucket.anchors.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
  # an object here is locked for years, and verify reads every one: nobody but the anchor function
  # (an account admin, a deploy role) may add one
  statement {
    sid       = "OnlyTheAnchorFunctionWrites"
    effect    = "Deny"
    actions   = ["s3:PutObject", "s3:PutObjectRetention", "s3:PutObjectLegalHold"]
    resources = ["${aws_s3_bucket.anchors.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "ArnNotEquals"
      variable = "aws:PrincipalArn"
      values   = [aws_iam_role.fn["anchor"].arn]
    }
  }
}

resource "aws_s3_bucket_policy" "anchors" {
  bucket = aws_s3_bucket.anchors.id
  policy = data.aws_iam_policy_document.anchors_tls.json
}

resource "aws_s3_bucket" "logs" {
  #checkov:skip=CKV_AWS_18:this is the access-log bucket itself
  #checkov:skip=CKV_AWS_144:cross-region replication of access logs is a deployment choice
  #checkov:skip=CKV2_AWS_62:no consumer for event notifications on access logs
  #checkov:skip=CKV_AWS_145:S3 server access logging delivers only to SSE-S3 buckets
  bucket_prefix = "${var.name}-access-logs-"
  tags          = var.tags
}

resource "aws_s3_bucket_versioning" "logs" {
  bucket = aws_s3_bucket.logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_public_access_block" "logs" {
  bucket                  = aws_s3_bucket.logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_lifecycle_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    id     = "expire"
    status = "Enabled"
    filter {}
    expiration {
      days = 365
    }
    noncurrent_version_expiration {
      noncurrent_days = 30
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

# --- queues ---------------------------------------------------------------------------------------

resource "aws_sqs_queue" "ingest_dlq" {
  name                      = "${var.name}-ingest-dlq"
  message_retention_seconds = 1209600
  kms_master_key_id         = aws_kms_key.this.arn
  tags                      = var.tags
}

resource "aws_sqs_queue" "ingest" {
  name                       = "${var.name}-ingest"
  visibility_timeout_seconds = 360
  kms_master_key_id          = aws_kms_key.this.arn
  redrive_policy             = jsonencode({ deadLetterTargetArn = aws_sqs_queue.ingest_dlq.arn, maxReceiveCount = 5 })
  tags                       = var.tags
}

resource "aws_sqs_queue" "lifecycle_dlq" {
  name                      = "${var.name}-lifecycle-dlq"
  message_retention_seconds = 1209600
  kms_master_key_id         = aws_kms_key.this.arn
  tags                      = var.tags
}

resource "aws_sqs_queue" "lifecycle" {
  name                       = "${var.name}-lifecycle"
  visibility_timeout_seconds = 360
  kms_master_key_id          = aws_kms_key.this.arn
  redrive_policy             = jsonencode({ deadLetterTargetArn = aws_sqs_queue.lifecycle_dlq.arn, maxReceiveCount = 3 })
  tags                       = var.tags
}

resource "aws_sqs_queue" "compute_dlq" {
  name                      = "${var.name}-compute-dlq.fifo"
  fifo_queue                = true
  message_retention_seconds = 1209600
  kms_master_key_id         = aws_kms_key.this.arn
  tags                      = var.tags
}

resource "aws_sqs_queue" "compute" {
  name                       = "${var.name}-compute.fifo"
  fifo_queue                 = true
  visibility_timeout_seconds = 960
  kms_master_key_id          = aws_kms_key.this.arn
  redrive_policy             = jsonencode({ deadLetterTargetArn = aws_sqs_queue.compute_dlq.arn, maxReceiveCount = 5 })
  tags                       = var.tags
}

# compute's priority lane: an administrator's changes (a quarantine, a mode, a binding, a policy),
# read by the same compute function (concurrency 1) beside the compute queue, so they never wait
# behind a storm's backlog there. Compute reads every workload as stored when it runs: the order
# between the two queues changes only how soon each is computed
resource "aws_sqs_queue" "compute_priority" {
  name                       = "${var.name}-compute-priority.fifo"
  fifo_queue                 = true
  visibility_timeout_seconds = 960
  kms_master_key_id          = aws_kms_key.this.arn
  redrive_policy             = jsonencode({ deadLetterTargetArn = aws_sqs_queue.compute_dlq.arn, maxReceiveCount = 5 })
  tags                       = var.tags
}

resource "aws_sqs_queue" "publish_dlq" {
  name                      = "${var.name}-publish-dlq"
  message_retention_seconds = 1209600
  kms_master_key_id         = aws_kms_key.this.arn
  tags                      = var.tags
}

# compute's fan-out: rendered bundles and nudges for the publish workers (standard: jobs are
# independent, a bundle pointer never moves backwards)
resource "aws_sqs_queue" "publish" {
  name                       = "${var.name}-publish"
  visibility_timeout_seconds = 720 # 6 x the publish function's timeout
  kms_master_key_id          = aws_kms_key.this.arn
  redrive_policy             = jsonencode({ deadLetterTargetArn = aws_sqs_queue.publish_dlq.arn, maxReceiveCount = 5 })
  tags                       = var.tags
}

resource "aws_sqs_queue" "perimeter_dlq" {
  name                      = "${var.name}-perimeter-dlq"
  message_retention_seconds = 1209600
  kms_master_key_id         = aws_kms_key.this.arn
  tags                      = var.tags
}

# workloads ingest/lifecycle saw change; a launch's lifecycle action waits here for its groups
resource "aws_sqs_queue" "perimeter" {
  name                       = "${var.name}-perimeter"
  visibility_timeout_seconds = 960 # >= the perimeter function's timeout
  kms_master_key_id          = aws_kms_key.this.arn
  redrive_policy             = jsonencode({ deadLetterTargetArn = aws_sqs_queue.perimeter_dlq.arn, maxReceiveCount = 3 })
  tags                       = var.tags
}

resource "aws_sqs_queue" "async_dlq" {
  name                      = "${var.name}-async-dlq"
  message_retention_seconds = 1209600
  kms_master_key_id         = aws_kms_key.this.arn
  tags                      = var.tags
}

# --- event rules (patterns mirror ringfence.clouds.aws.patterns; a test checks) --------------------

locals {
  ingest_rules = {
    ec2-state-change = {
      source      = ["aws.ec2"]
      detail-type = ["EC2 Instance State-change Notification"]
    }
    tag-change = {
      source      = ["aws.tag"]
      detail-type = ["Tag Change on Resource"]
      detail      = { service = ["ec2"], resource-type = ["instance"] }
    }
    asg-instance = {
      source      = ["aws.autoscaling"]
      detail-type = ["EC2 Instance Launch Successful", "EC2 Instance Terminate Successful"]
    }
    cloudtrail-ec2 = {
      source      = ["aws.ec2"]
      detail-type = ["AWS API Call via CloudTrail"]
      detail      = { eventSource = ["ec2.amazonaws.com"], eventName = ["CreateTags", "DeleteTags", "RunInstances"] }
    }
  }
  lifecycle_rules = {
    asg-lifecycle = {
      source      = ["aws.autoscaling"]
      detail-type = ["EC2 Instance-launch Lifecycle Action", "EC2 Instance-terminate Lifecycle Action"]
      # Ringfence's own hooks only: another team's hook on the same group is not ours to complete
      detail = { LifecycleHookName = var.lifecycle_hook_names }
    }
  }
}

resource "aws_cloudwatch_event_rule" "ingest" {
  for_each      = local.ingest_rules
  name          = "${var.name}-${each.key}"
  event_pattern = jsonencode(each.value)
  tags          = var.tags
}

resource "aws_cloudwatch_event_target" "ingest" {
  for_each = local.ingest_rules
  rule     = aws_cloudwatch_event_rule.ingest[each.key].name
  arn      = aws_sqs_queue.ingest.arn
}

resource "aws_cloudwatch_event_rule" "lifecycle" {
  for_each      = local.lifecycle_rules
  name          = "${var.name}-${each.key}"
  event_pattern = jsonencode(each.value)
  tags          = var.tags
}

resource "aws_cloudwatch_event_target" "lifecycle" {
  for_each = local.lifecycle_rules
  rule     = aws_cloudwatch_event_rule.lifecycle[each.key].name
  arn      = aws_sqs_queue.lifecycle.arn
}

# Every queue refuses every sender but its producers (as template.yaml): the event queues take only
# their rules' deliveries (aws:SourceArn), the hand-off queues only the producing functions' roles
# (aws:PrincipalArn), DLQs only SQS's redrive and the roles that write to them. A Deny holds against
# identity policies too; the consumers confirm with the cloud anyway.
locals {
  fn_role = { for k, r in aws_iam_role.fn : k => r.arn }
  queue_senders = {
    compute = { queue = aws_sqs_queue.compute.arn, roles = compact([local.fn_role["ingest"], local.fn_role["lifecycle"], local.fn_role["reconcile"], local.fn_role["perimeter"], local.fn_role["agentapi"], local.fn_role["admin"], try(local.fn_role["gcpevents"], ""), try(local.fn_role["azureevents"], ""), try(local.fn_role["cloudreconcile"], "")]) }
    # the priority lane: the administrator's changes, and AWS instances leaving their peers' sets
    # (ingest, lifecycle, reconcile: at most one per instance state change)
    compute_priority = { queue = aws_sqs_queue.compute_priority.arn, roles = [local.fn_role["admin"], local.fn_role["ingest"], local.fn_role["lifecycle"], local.fn_role["reconcile"]] }
    perimeter        = { queue = aws_sqs_queue.perimeter.arn, roles = [local.fn_role["ingest"], local.fn_role["lifecycle"], local.fn_role["reconcile"], local.fn_role["perimeter"]] } # itself: a failed place's part sent again
    publish          = { queue = aws_sqs_queue.publish.arn, roles = [local.fn_role["compute"]] }
    ingest_dlq       = { queue = aws_sqs_queue.ingest_dlq.arn, roles = [local.fn_role["ingest"]] }
    # Lambda sends a failed async invocation with the function's own role (every function has this DLQ)
    async_dlq = { queue = aws_sqs_queue.async_dlq.arn, roles = compact([local.fn_role["ingest"], local.fn_role["compute"], local.fn_role["publish"], local.fn_role["lifecycle"], local.fn_role["reconcile"], local.fn_role["perimeter"], local.fn_role["agentapi"], local.fn_role["admin"], local.fn_role["wsconnect"], local.fn_role["flows"], local.fn_role["anchor"], try(local.fn_role["gcpevents"], ""), try(local.fn_role["azureevents"], ""), try(local.fn_role["cloudreconcile"], "")]) }
  }
  redrive_only_dlqs = {
    lifecycle_dlq = aws_sqs_queue.lifecycle_dlq
    compute_dlq   = aws_sqs_queue.compute_dlq
    perimeter_dlq = aws_sqs_queue.perimeter_dlq
    publish_dlq   = aws_sqs_queue.publish_dlq
  }
}

data "aws_iam_policy_document" "event_queues" {
  for_each = {
    ingest    = { queue = aws_sqs_queue.ingest.arn, rules = [for r in aws_cloudwatch_event_rule.ingest : r.arn] }
    lifecycle = { queue = aws_sqs_queue.lifecycle.arn, rules = [for r in aws_cloudwatch_event_rule.lifecycle : r.arn] }
  }
  statement {
    sid       = "FromOurRules"
    actions   = ["sqs:SendMessage"]
    resources = [each.value.queue]
    principals {
      type        = "Service"
      identifiers = ["events.amazonaws.com"]
    }
    condition {
      test     = "ArnEquals"
      variable = "aws:SourceArn"
      values   = each.value.rules
    }
  }
  statement {
    sid       = "OnlyFromOurRules"
    effect    = "Deny"
    actions   = ["sqs:SendMessage"]
    resources = [each.value.queue]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "ArnNotEquals"
      variable = "aws:SourceArn"
      values   = each.value.rules
    }
  }
}

resource "aws_sqs_queue_policy" "ingest" {
  queue_url = aws_sqs_queue.ingest.id
  policy    = data.aws_iam_policy_document.event_queues["ingest"].json
}

resource "aws_sqs_queue_policy" "lifecycle" {
  queue_url = aws_sqs_queue.lifecycle.id
  policy    = data.aws_iam_policy_document.event_queues["lifecycle"].json
}

data "aws_iam_policy_document" "handoff_queues" {
  for_each = local.queue_senders
  statement {
    sid       = "OnlyFromProducers"
    effect    = "Deny"
    actions   = ["sqs:SendMessage"]
    resources = [each.value.queue]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "ArnNotEquals"
      variable = "aws:PrincipalArn"
      values   = each.value.roles
    }
    condition {
      test     = "Null" # SQS's own redrive carries no principal
      variable = "aws:PrincipalArn"
      values   = ["false"]
    }
  }
  statement {
    sid       = "NoServiceDeliveries" # nor a service acting for some resource (a rule, a topic)
    effect    = "Deny"
    actions   = ["sqs:SendMessage"]
    resources = [each.value.queue]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Null"
      variable = "aws:SourceArn"
      values   = ["false"]
    }
  }
}

resource "aws_sqs_queue_policy" "handoff" {
  for_each  = local.queue_senders
  queue_url = { compute = aws_sqs_queue.compute.id, compute_priority = aws_sqs_queue.compute_priority.id, perimeter = aws_sqs_queue.perimeter.id, publish = aws_sqs_queue.publish.id, ingest_dlq = aws_sqs_queue.ingest_dlq.id, async_dlq = aws_sqs_queue.async_dlq.id }[each.key]
  policy    = data.aws_iam_policy_document.handoff_queues[each.key].json
}

data "aws_iam_policy_document" "redrive_only" {
  for_each = local.redrive_only_dlqs
  statement {
    sid       = "NoSenders" # only SQS's redrive from the source queue (no IAM principal) fills these
    effect    = "Deny"
    actions   = ["sqs:SendMessage"]
    resources = [each.value.arn]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Null"
      variable = "aws:PrincipalArn"
      values   = ["false"]
    }
  }
  statement {
    sid       = "NoServiceDeliveries" # nor a service acting for some resource (a rule, a topic)
    effect    = "Deny"
    actions   = ["sqs:SendMessage"]
    resources = [each.value.arn]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Null"
      variable = "aws:SourceArn"
      values   = ["false"]
    }
  }
}

resource "aws_sqs_queue_policy" "redrive_only" {
  for_each  = local.redrive_only_dlqs
  queue_url = each.value.id
  policy    = data.aws_iam_policy_document.redrive_only[each.key].json
}
