# --- functions ------------------------------------------------------------------------------------

locals {
  common_env = {
    POWERTOOLS_SERVICE_NAME       = "ringfence"
    POWERTOOLS_METRICS_NAMESPACE  = "Ringfence"
    POWERTOOLS_LOG_LEVEL          = "INFO"
    RINGFENCE_INVENTORY_TABLE     = aws_dynamodb_table.inventory.name
    RINGFENCE_STATE_TABLE         = aws_dynamodb_table.state.name
    RINGFENCE_AUDIT_TABLE         = aws_dynamodb_table.audit.name
    RINGFENCE_IDEMPOTENCY_TABLE   = aws_dynamodb_table.idempotency.name
    RINGFENCE_BUCKET              = aws_s3_bucket.bundles.id
    RINGFENCE_KMS_KEY_ID          = aws_kms_key.this.arn
    RINGFENCE_COMPUTE_QUEUE_URL   = aws_sqs_queue.compute.id
    RINGFENCE_PERIMETER_QUEUE_URL = aws_sqs_queue.perimeter.id
    RINGFENCE_DLQ_URL             = aws_sqs_queue.ingest_dlq.id
    RINGFENCE_IID_CERT            = var.iid_certificate
    RINGFENCE_ALLOWED_ACCOUNTS    = join(",", var.allowed_accounts)
    RINGFENCE_ACCOUNT_ROLES       = jsonencode(var.account_roles)
    RINGFENCE_RECONCILE_TARGETS   = jsonencode(var.reconcile_targets)
    RINGFENCE_OFFLINE_AFTER       = tostring(var.offline_after_seconds)
    RINGFENCE_LIFECYCLE_GATE      = var.lifecycle_gate
    RINGFENCE_ENROLL_METHODS      = join(",", var.enroll_methods)
    RINGFENCE_TOKEN_TTL           = tostring(var.agent_token_ttl_seconds)
    RINGFENCE_STS_ENDPOINTS       = join(",", var.sts_endpoints)
    RINGFENCE_WEBSOCKET_ENDPOINT  = "https://${aws_apigatewayv2_api.nudge.id}.execute-api.${local.region}.amazonaws.com/v1"
    RINGFENCE_SIEM                = local.siem_spec

    # no answer or error message in X-Ray traces: an answer can hold a bearer token or a pairing key
    POWERTOOLS_TRACER_CAPTURE_RESPONSE = "false"
    POWERTOOLS_TRACER_CAPTURE_ERROR    = "false"
  }

  functions = {
    # an instance leaving its peers' sets (terminated, stopped) in compute's priority lane
    ingest = { memory = 512, timeout = 60, concurrency = 20, env = { RINGFENCE_COMPUTE_PRIORITY_QUEUE_URL = aws_sqs_queue.compute_priority.id } }
    # only compute (set deltas) and publish (bundles) hold (a reference to) the signing key; see signing.tf
    compute = {
      memory = 2048, timeout = 900, concurrency = 1,
      env = {
        RINGFENCE_SIGNING_KEY       = local.signing_key_id
        RINGFENCE_PUBLISH_QUEUE_URL = aws_sqs_queue.publish.id
        # member accounts' lifecycle actions are completed through this role there
        RINGFENCE_MEMBER_LIFECYCLE_ROLE = var.member_lifecycle_role_name
        # the lifecycle hooks whose actions compute completes (no other's)
        RINGFENCE_LIFECYCLE_HOOK_NAMES = join(",", var.lifecycle_hook_names)
      }
    }
    # parallel workers (no reservation: the event source's maximum_concurrency bounds them)
    publish = { memory = 1024, timeout = 120, concurrency = -1, env = { RINGFENCE_SIGNING_KEY = local.signing_key_id } }
    # the lifecycle hooks whose actions are handed on to compute (no other's); a terminating
    # instance leaving its peers' sets in compute's priority lane
    lifecycle = { memory = 512, timeout = 60, concurrency = 10, env = { RINGFENCE_LIFECYCLE_HOOK_NAMES = join(",", var.lifecycle_hook_names), RINGFENCE_COMPUTE_PRIORITY_QUEUE_URL = aws_sqs_queue.compute_priority.id } }
    # the gated groups' launch hooks that abandon launches under a name not in the list are
    # reported; what it finds gone, stopped or offline leaves its peers' sets in the priority lane
    reconcile = { memory = 1024, timeout = 900, concurrency = 1, env = { RINGFENCE_LIFECYCLE_HOOK_NAMES = join(",", var.lifecycle_hook_names), RINGFENCE_GATED_GROUP_NAMES = var.gated_group_names, RINGFENCE_COMPUTE_PRIORITY_QUEUE_URL = aws_sqs_queue.compute_priority.id } }
    perimeter = {
      memory = 512, timeout = 900, concurrency = 1,
      env = {
        RINGFENCE_PERIMETER_CONFIG        = jsonencode(var.perimeter_config)
        RINGFENCE_PERIMETER_DRY_RUN       = var.perimeter_dry_run ? "true" : "false"
        RINGFENCE_PERIMETER_ACCOUNT_ROLES = jsonencode(var.perimeter_account_roles)
      }
    }
    # wait long-polls ≤ 25 s; azure-attested / gcp-jwt enrollment where var.azure / var.gcp configure them
    agentapi = { memory = 512, timeout = 30, concurrency = 100, env = merge(
      var.azure == null ? {} : {
        RINGFENCE_AZURE_SUBSCRIPTIONS  = var.azure.subscriptions
        RINGFENCE_AZURE_ATTESTED_ROOTS = var.azure.attested_roots
      },
      var.gcp == null ? {} : {
        RINGFENCE_GCP_PROJECTS          = var.gcp.projects
        RINGFENCE_GCP_TAG_PARENTS       = var.gcp.tag_parents
        RINGFENCE_GCP_LABEL_SOURCE      = var.gcp.label_source
        RINGFENCE_GCP_IDENTITY_AUDIENCE = var.gcp.identity_audience
        RINGFENCE_GCP_CREDENTIALS       = var.gcp.credentials
      },
      {
        RINGFENCE_REPORT_BYTES_PER_SECOND = tostring(var.report_bytes_per_second)
        RINGFENCE_REPORT_BURST_BYTES      = tostring(var.report_burst_bytes)
      },
    ) }
    # urgent compute work (a quarantine, a mode, a binding, a policy) in compute's priority lane
    admin     = { memory = 512, timeout = 29, concurrency = 5, env = { RINGFENCE_ADMIN_ROLES = jsonencode(var.admin_roles), RINGFENCE_COMPUTE_PRIORITY_QUEUE_URL = aws_sqs_queue.compute_priority.id } }
    wsconnect = { memory = 256, timeout = 10, concurrency = 20, env = {} }
    flows     = { memory = 1024, timeout = 300, concurrency = 10, env = { FLOW_LOG_ACCOUNTS = join(",", var.flow_log_accounts) } }
    # the audit chain's head to the anchor bucket, on var.audit_anchor_schedule (docs/visibility.md)
    anchor = { memory = 256, timeout = 120, concurrency = 1, env = { RINGFENCE_ANCHOR_BUCKET = aws_s3_bucket.anchors.id } }
  }
  # the GCP events function exists only with var.gcp (its layer carries the Google SDKs)
  gcp_functions = var.gcp == null ? {} : {
    gcpevents = {
      memory = 512, timeout = 29, concurrency = 20,
      env = {
        RINGFENCE_GCP_PROJECTS              = var.gcp.projects
        RINGFENCE_GCP_TAG_PARENTS           = var.gcp.tag_parents
        RINGFENCE_GCP_LABEL_SOURCE          = var.gcp.label_source
        RINGFENCE_GCP_EVENTS_AUDIENCE       = var.gcp.events_audience
        RINGFENCE_GCP_PUSH_SERVICE_ACCOUNTS = var.gcp.push_service_accounts
        RINGFENCE_GCP_CREDENTIALS           = var.gcp.credentials
      }
    }
  }
  # the Azure events function exists only with var.azure; its secrets are read by ARN at cold start
  azure_functions = var.azure == null ? {} : {
    azureevents = {
      memory = 512, timeout = 29, concurrency = 20,
      env = {
        RINGFENCE_AZURE_SUBSCRIPTIONS          = var.azure.subscriptions
        RINGFENCE_EVENTGRID_SECRET_ARN         = var.azure.eventgrid_secret_arn
        RINGFENCE_AZURE_CREDENTIALS_SECRET_ARN = var.azure.credentials_secret_arn
        RINGFENCE_EVENTGRID_TENANT             = var.azure.eventgrid_tenant
        RINGFENCE_EVENTGRID_AUDIENCE           = var.azure.eventgrid_audience
      }
    }
  }
  # the other clouds' scheduled full pass (inventory missed by events, then their perimeters where
  # configured), on the reconcile schedule; it exists with var.azure or var.gcp
  cloud_functions = var.azure == null && var.gcp == null ? {} : {
    cloudreconcile = {
      memory = 1024, timeout = 900, concurrency = 1,
      env = merge(
        { RINGFENCE_PERIMETER_CONFIG = jsonencode(var.perimeter_config) },
        var.azure == null ? {} : {
          RINGFENCE_AZURE_SUBSCRIPTIONS          = var.azure.subscriptions
          RINGFENCE_AZURE_PERIMETER              = var.azure.perimeter ? "true" : "false"
          RINGFENCE_AZURE_CREDENTIALS_SECRET_ARN = var.azure.credentials_secret_arn
        },
        var.gcp == null ? {} : {
          RINGFENCE_GCP_PROJECTS     = var.gcp.projects
          RINGFENCE_GCP_TAG_PARENTS  = var.gcp.tag_parents
          RINGFENCE_GCP_LABEL_SOURCE = var.gcp.label_source
          RINGFENCE_GCP_CREDENTIALS  = var.gcp.credentials
          RINGFENCE_GCP_PERIMETER    = var.gcp.perimeter
        },
      )
    }
  }
  all_functions = merge(local.functions, local.gcp_functions, local.azure_functions, local.cloud_functions)
  # the secrets each function reads (GetSecretValue on exactly these ARNs)
  azure_secrets = var.azure == null ? [] : compact([var.azure.eventgrid_secret_arn, var.azure.credentials_secret_arn])
  # the dependency layers each function carries after the core layer
  cloud_layers = {
    azureevents    = aws_lambda_layer_version.azure[*].arn
    gcpevents      = aws_lambda_layer_version.gcp[*].arn
    agentapi       = concat(aws_lambda_layer_version.azure[*].arn, aws_lambda_layer_version.gcp[*].arn)
    cloudreconcile = concat(aws_lambda_layer_version.azure[*].arn, aws_lambda_layer_version.gcp[*].arn)
  }

  member_roles    = "arn:${local.partition}:iam::*:role/${var.member_role_name}"
  perimeter_roles = "arn:${local.partition}:iam::*:role/${var.member_perimeter_role_name}"
  lifecycle_roles = "arn:${local.partition}:iam::*:role/${var.member_lifecycle_role_name}"
  sg_arn          = "arn:${local.partition}:ec2:${local.region}:${local.account}:security-group/*"
  kms_use         = { actions = ["kms:Decrypt", "kms:GenerateDataKey"], resources = [aws_kms_key.this.arn] }
  describe        = { actions = ["ec2:DescribeInstances"], resources = ["*"] }
  # with the members' organization named: its accounts' roles only
  member_org = var.member_organization_id == "" ? [] : [{ test = "StringEquals", variable = "aws:ResourceOrgID", values = [var.member_organization_id] }]
  assume     = { actions = ["sts:AssumeRole"], resources = [local.member_roles], conditions = local.member_org }
  # the perimeter's writes in member accounts: a role of its own, assumed by the perimeter only
  assume_perimeter = { actions = ["sts:AssumeRole"], resources = [local.perimeter_roles], conditions = local.member_org }
  # compute's CompleteLifecycleAction in member accounts: a role of its own, assumed by compute only
  assume_lifecycle = { actions = ["sts:AssumeRole"], resources = [local.lifecycle_roles], conditions = local.member_org }
  policies_read    = { actions = ["s3:GetObject"], resources = ["${aws_s3_bucket.bundles.arn}/policies/*"] }
  async_dlq        = { actions = ["sqs:SendMessage"], resources = [aws_sqs_queue.async_dlq.arn] }

  # a terminate lifecycle action is confirmed with Auto Scaling (no resource-level permissions)
  asg_describe = { actions = ["autoscaling:DescribeAutoScalingInstances"], resources = ["*"] }
  # reconcile: the gated groups' lifecycle hooks, for hooks left to abandon launches (no resource-level permissions)
  asg_hooks_read = { actions = ["autoscaling:DescribeAutoScalingGroups", "autoscaling:DescribeLifecycleHooks"], resources = ["*"] }

  # the perimeter's writes: only in the managed VPCs, only our tag keys on the groups it creates
  in_vpcs      = { test = "ArnLike", variable = "ec2:Vpc", values = coalesce(var.perimeter_vpc_arns, ["arn:${local.partition}:ec2:${local.region}:${local.account}:vpc/*"]) }
  our_tag_keys = { test = "ForAllValues:StringEquals", variable = "aws:TagKeys", values = ["ringfence:perimeter", "Name"] }

  # the state items a retirement deletes (control/credentials.py retire: token, nudge connection):
  # the only state deletions of the functions fed by cloud events. Never a key binding or a
  # reset's named next key: deleting those of a running workload would let a copied identity
  # document bind another key (the administrator unbinds keys)
  retire_keys = { test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["token#*", "tokenof#*", "conn#*"] }
  # the inventory attributes those functions write (DynamoStore.observe; reconcile's offline
  # mark): never op_mode or op_quarantined, the administrator's (governance's quarantine is an item
  # of its own, below). labels and label_writes IAM cannot hold to safe values (docs/threat-model.md)
  observed_attrs   = { test = "ForAllValues:StringEquals", variable = "dynamodb:Attributes", values = ["id", "workload", "state", "observed_at", "labels", "problems", "governed_rev", "label_writes", "tag_version", "account"] }
  observed_offline = { test = "ForAllValues:StringEquals", variable = "dynamodb:Attributes", values = ["id", "workload", "state", "observed_at", "labels", "problems", "governed_rev", "label_writes", "tag_version", "account", "offline"] }
  observe          = { actions = ["dynamodb:UpdateItem"], resources = [aws_dynamodb_table.inventory.arn], conditions = [local.observed_attrs] }
  # governance's quarantine (DynamoStore.set_operator): its own item, put in a transaction that
  # checks the record exists (a check writes nothing). Never deleted or updated by those functions:
  # a put can only quarantine, and only the administrator's role releases
  quarantine_keys = { test = "ForAllValues:StringEquals", variable = "dynamodb:LeadingKeys", values = ["quarantine"] }
  quarantine_put  = { actions = ["dynamodb:PutItem"], resources = [aws_dynamodb_table.state.arn], conditions = [local.quarantine_keys, { test = "ForAllValues:StringEquals", variable = "dynamodb:Attributes", values = ["pk", "sk"] }] }
  record_check    = { actions = ["dynamodb:ConditionCheckItem"], resources = [aws_dynamodb_table.inventory.arn] }
  # a GCP audit entry's approval, finding or split-call decision, claimed once (clouds/gcp/ingest.py)
  gcp_once_keys = { test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["once#confirmed#*", "once#blamed#*", "once#decided-last#*"] }
  retire        = { actions = ["dynamodb:DeleteItem"], resources = [aws_dynamodb_table.state.arn], conditions = [local.retire_keys] }
  gcp_once      = { actions = ["dynamodb:PutItem"], resources = [aws_dynamodb_table.state.arn], conditions = [local.gcp_once_keys] }
  # a privileged-label finding counted once (control/governance.py): its claim only, by the
  # functions whose events name a call's principal (the scheduled passes raise no finding)
  counted_put = { actions = ["dynamodb:PutItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["once#counted#*"] }, { test = "ForAllValues:StringEquals", variable = "dynamodb:Attributes", values = ["pk", "sk", "ttl"] }] }
  # a workload owed to compute (control/wiring.py owe_compute): a hand-off that failed, marked by
  # the functions that hand on what they store, each in its own partition owed#<function> alone
  # (a compromised one delays only its own marks); the scheduled passes drain every writer's (and
  # owed#serve, `ringfence serve --store aws`'s, written with the operator's credentials) and the
  # legacy `owed` one (DeleteItem, conditioned on the mark's nonce; no role writes `owed`)
  owed_attrs               = { test = "ForAllValues:StringEquals", variable = "dynamodb:Attributes", values = ["pk", "sk", "nonce", "urgent"] }
  owed_mark_ingest         = { actions = ["dynamodb:UpdateItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringEquals", variable = "dynamodb:LeadingKeys", values = ["owed#ingest"] }, local.owed_attrs] }
  owed_mark_lifecycle      = { actions = ["dynamodb:UpdateItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringEquals", variable = "dynamodb:LeadingKeys", values = ["owed#lifecycle"] }, local.owed_attrs] }
  owed_mark_reconcile      = { actions = ["dynamodb:UpdateItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringEquals", variable = "dynamodb:LeadingKeys", values = ["owed#reconcile"] }, local.owed_attrs] }
  owed_mark_gcpevents      = { actions = ["dynamodb:UpdateItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringEquals", variable = "dynamodb:LeadingKeys", values = ["owed#gcpevents"] }, local.owed_attrs] }
  owed_mark_azureevents    = { actions = ["dynamodb:UpdateItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringEquals", variable = "dynamodb:LeadingKeys", values = ["owed#azureevents"] }, local.owed_attrs] }
  owed_mark_cloudreconcile = { actions = ["dynamodb:UpdateItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringEquals", variable = "dynamodb:LeadingKeys", values = ["owed#cloudreconcile"] }, local.owed_attrs] }
  owed_drain               = { actions = ["dynamodb:DeleteItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringEquals", variable = "dynamodb:LeadingKeys", values = ["owed", "owed#ingest", "owed#lifecycle", "owed#reconcile", "owed#gcpevents", "owed#azureevents", "owed#cloudreconcile", "owed#serve"] }, local.owed_attrs] }

  # least privilege, per function
  statements = {
    ingest = [
      { actions = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem"], resources = [aws_dynamodb_table.idempotency.arn] },
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem"], resources = [aws_dynamodb_table.inventory.arn] },
      local.observe,
      # BatchGetItem, Query: a record is read with its quarantine item (DynamoStore.get_many)
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query"], resources = [aws_dynamodb_table.state.arn] },
      # a terminated instance's agent token and connection are revoked (audited): those items
      # only, never the active policy, a bundle pointer or the engine head
      local.retire,
      local.quarantine_put, local.record_check, local.counted_put, local.owed_mark_ingest,
      { actions = ["dynamodb:GetItem", "dynamodb:PutItem"], resources = [aws_dynamodb_table.audit.arn] },
      { actions = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"], resources = [aws_sqs_queue.ingest.arn] },
      # the priority lane: an instance leaving its peers' sets
      { actions = ["sqs:SendMessage"], resources = [aws_sqs_queue.compute.arn, aws_sqs_queue.compute_priority.arn, aws_sqs_queue.perimeter.arn, aws_sqs_queue.ingest_dlq.arn, aws_sqs_queue.async_dlq.arn] },
      local.policies_read, local.describe, local.asg_describe, local.assume, local.kms_use,
    ]
    compute = concat([
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Scan"], resources = [aws_dynamodb_table.inventory.arn] },
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query"], resources = [aws_dynamodb_table.state.arn] },
      # writes: the partitions its code writes only (tests/aws/test_sg_record_writers.py), never
      # a security group's record (sg#: the perimeter's alone), a token or a key
      { actions = ["dynamodb:PutItem", "dynamodb:UpdateItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["engine", "moved", "bundle#*", "sethead#*", "delta#*", "launch#*"] }] },
      # a nudged connection gone (GoneException), dropped on condition it is that one
      { actions = ["dynamodb:DeleteItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["conn#*"] }] },
      { actions = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"], resources = [aws_sqs_queue.compute.arn, aws_sqs_queue.compute_priority.arn] },
      { actions = ["s3:PutObject", "s3:GetObject"], resources = ["${aws_s3_bucket.bundles.arn}/bundles/*", "${aws_s3_bucket.bundles.arn}/deltas/*", "${aws_s3_bucket.bundles.arn}/keys/*", "${aws_s3_bucket.bundles.arn}/policies/*"] },
      # the fan-out: jobs for the publish workers, unsigned bundles too big for a message staged
      { actions = ["sqs:SendMessage"], resources = [aws_sqs_queue.publish.arn] },
      { actions = ["s3:PutObject"], resources = ["${aws_s3_bucket.bundles.arn}/staging/*"] },
      # the only function that completes lifecycle actions (the agent API reports to it through
      # the compute queue: ringfence.control.launchgate), in every Region of this account and in
      # member accounts through their lifecycle role (CompleteLifecycleAction only)
      { actions = ["autoscaling:CompleteLifecycleAction"], resources = ["arn:${local.partition}:autoscaling:*:${local.account}:autoScalingGroup:*:autoScalingGroupName/${var.gated_group_names}"] },
      local.assume_lifecycle,
      { actions = ["execute-api:ManageConnections"], resources = ["${aws_apigatewayv2_api.nudge.execution_arn}/v1/POST/@connections/*"] },
      local.async_dlq, local.kms_use,
      ], local.signing_kms ? [] : [
      { actions = ["secretsmanager:GetSecretValue"], resources = [var.signing_key_secret_arn] },
    ])
    publish = concat([
      # bundle pointers (conditional: never backwards), the published count and its records,
      # WebSocket connections (read; dropped when gone). Writes only those items: never compute's
      # pending mark beside a pointer, the engine head's revision, a set head, a delta or the policy
      { actions = ["dynamodb:GetItem"], resources = [aws_dynamodb_table.state.arn] },
      # a pointer is an update of its fields only: a PutItem would replace the item and a
      # DeleteItem remove it, either dropping compute's pending mark without naming it
      { actions = ["dynamodb:UpdateItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["bundle#*"] }, { test = "ForAllValues:StringEquals", variable = "dynamodb:Attributes", values = ["pk", "sk", "version", "doc"] }] },
      # the published records (one new item per count)
      { actions = ["dynamodb:PutItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringEquals", variable = "dynamodb:LeadingKeys", values = ["published"] }, { test = "ForAllValues:StringEquals", variable = "dynamodb:Attributes", values = ["pk", "sk", "doc", "ttl"] }] },
      # a connection gone (the nudge's GoneException) is dropped, on condition it is still that one
      { actions = ["dynamodb:DeleteItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["conn#*"] }, { test = "ForAllValues:StringEquals", variable = "dynamodb:Attributes", values = ["pk", "sk", "connection_id"] }] },
      { actions = ["dynamodb:UpdateItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringEquals", variable = "dynamodb:LeadingKeys", values = ["engine"] }, { test = "ForAllValues:StringEquals", variable = "dynamodb:Attributes", values = ["pk", "sk", "published"] }] },
      { actions = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"], resources = [aws_sqs_queue.publish.arn] },
      { actions = ["s3:PutObject"], resources = ["${aws_s3_bucket.bundles.arn}/bundles/*", "${aws_s3_bucket.bundles.arn}/keys/*"] },
      { actions = ["s3:GetObject", "s3:DeleteObject"], resources = ["${aws_s3_bucket.bundles.arn}/staging/*"] },
      { actions = ["execute-api:ManageConnections"], resources = ["${aws_apigatewayv2_api.nudge.execution_arn}/v1/POST/@connections/*"] },
      local.async_dlq, local.kms_use,
      ], local.signing_kms ? [] : [
      { actions = ["secretsmanager:GetSecretValue"], resources = [var.signing_key_secret_arn] },
    ])
    lifecycle = [
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem"], resources = [aws_dynamodb_table.inventory.arn] },
      local.observe,
      # BatchGetItem, Query: a record is read with its quarantine item (DynamoStore.get_many)
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query"], resources = [aws_dynamodb_table.state.arn] },
      # an instance seen terminated: its token and connection go (those items only)
      local.retire,
      local.quarantine_put, local.record_check, local.owed_mark_lifecycle,
      # a refused terminate and governance findings are audited (the chain head read, then the record)
      { actions = ["dynamodb:GetItem", "dynamodb:PutItem"], resources = [aws_dynamodb_table.audit.arn] },
      { actions = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"], resources = [aws_sqs_queue.lifecycle.arn] },
      # the priority lane: a terminating instance leaving its peers' sets
      { actions = ["sqs:SendMessage"], resources = [aws_sqs_queue.compute.arn, aws_sqs_queue.compute_priority.arn, aws_sqs_queue.perimeter.arn, aws_sqs_queue.async_dlq.arn] },
      local.policies_read, local.describe, local.asg_describe, local.assume, local.kms_use,
    ]
    reconcile = [
      # BatchGetItem: each record read again just before it is decided (governance)
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Scan"], resources = [aws_dynamodb_table.inventory.arn] },
      # a missed heartbeat marks the workload offline
      { actions = ["dynamodb:UpdateItem"], resources = [aws_dynamodb_table.inventory.arn], conditions = [local.observed_offline] },
      local.quarantine_put, local.record_check, local.owed_mark_reconcile, local.owed_drain,
      # Query, BatchGetItem: the effective-policy findings (enforcement reports, set heads); a
      # vanished instance's token and connection deleted (those items only)
      { actions = ["dynamodb:GetItem", "dynamodb:Query", "dynamodb:BatchGetItem"], resources = [aws_dynamodb_table.state.arn] },
      local.retire,
      # a finding announced to the SIEM is claimed once, in its own items only
      { actions = ["dynamodb:PutItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["once#announced#*"] }] },
      { actions = ["dynamodb:GetItem", "dynamodb:PutItem"], resources = [aws_dynamodb_table.audit.arn] },
      # the priority lane: what it finds gone, stopped or offline
      { actions = ["sqs:SendMessage"], resources = [aws_sqs_queue.compute.arn, aws_sqs_queue.compute_priority.arn, aws_sqs_queue.perimeter.arn, aws_sqs_queue.async_dlq.arn] },
      local.policies_read, local.describe, local.asg_describe, local.asg_hooks_read, local.assume, local.kms_use,
    ]
    perimeter = [
      { actions = ["dynamodb:Scan", "dynamodb:GetItem", "dynamodb:BatchGetItem"], resources = [aws_dynamodb_table.inventory.arn] },
      # records are read with their quarantine items (DynamoStore), nothing else there
      { actions = ["dynamodb:BatchGetItem", "dynamodb:Query"], resources = [aws_dynamodb_table.state.arn], conditions = [local.quarantine_keys] },
      # the ids of the groups it created (clouds/aws/sg.py GroupRecords): a group is ours only if
      # recorded, and no other role may write these keys
      { actions = ["dynamodb:Query"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["sg#*"] }] },
      { actions = ["dynamodb:PutItem", "dynamodb:DeleteItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["sg#*"] }, { test = "ForAllValues:StringEquals", variable = "dynamodb:Attributes", values = ["pk", "sk", "network", "name", "how"] }] },
      # a group taken back (a stopped run's) or adopted (made before records) is audited first
      { actions = ["dynamodb:GetItem", "dynamodb:PutItem"], resources = [aws_dynamodb_table.audit.arn] },
      { actions = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"], resources = [aws_sqs_queue.perimeter.arn] },
      # its own queue: a failed account/Region's part of a message, sent again on its own
      { actions = ["sqs:SendMessage"], resources = [aws_sqs_queue.compute.arn, aws_sqs_queue.perimeter.arn, aws_sqs_queue.async_dlq.arn] },
      { actions = ["ec2:DescribeInstances", "ec2:DescribeSecurityGroups", "ec2:DescribeNetworkInterfaces"], resources = ["*"] },
      { actions = ["ec2:CreateSecurityGroup"], resources = local.in_vpcs.values },
      # only groups that carry the tag from birth, tags only in that same call
      { actions = ["ec2:CreateSecurityGroup"], resources = [local.sg_arn], conditions = [{ test = "Null", variable = "aws:RequestTag/ringfence:perimeter", values = ["false"] }, local.our_tag_keys] },
      { actions = ["ec2:CreateTags"], resources = [local.sg_arn], conditions = [{ test = "StringEquals", variable = "ec2:CreateAction", values = ["CreateSecurityGroup"] }, local.our_tag_keys] },
      # rules changed and groups deleted only where our tag is
      { actions = ["ec2:AuthorizeSecurityGroupIngress", "ec2:AuthorizeSecurityGroupEgress", "ec2:RevokeSecurityGroupIngress", "ec2:RevokeSecurityGroupEgress", "ec2:DeleteSecurityGroup"], resources = [local.sg_arn], conditions = [{ test = "Null", variable = "aws:ResourceTag/ringfence:perimeter", values = ["false"] }, local.in_vpcs] },
      # EC2 authorizes this against every group of the new list, the foreign ones written back
      # too, so a tag condition would refuse them; the code adds/removes only its own groups.
      # What holds here: interfaces and groups of the managed VPCs only
      { actions = ["ec2:ModifyNetworkInterfaceAttribute"], resources = ["arn:${local.partition}:ec2:${local.region}:${local.account}:network-interface/*", local.sg_arn], conditions = [local.in_vpcs] },
      local.assume_perimeter, local.kms_use,
    ]
    agentapi = [
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query"], resources = [aws_dynamodb_table.state.arn] },
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem"], resources = [aws_dynamodb_table.inventory.arn] },
      # writes only the agents' own items: never a bundle pointer, the active policy or the engine
      # head; on inventory an agent's liveness only, never its labels, mode or quarantine
      { actions = ["dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["nonce#*", "token#*", "tokenof#*", "agentkey#*", "nextkey#*", "conn#*", "pairing#*", "enforcing#*", "enforcement", "once#gcp-jwt:*", "once#refresh:*"] }] },
      # a pairing use checks, in its transaction, that the key's workload index item exists
      { actions = ["dynamodb:ConditionCheckItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["pairingof#*"] }] },
      # a workload's report bytes in the current window (the report quota): that count only
      { actions = ["dynamodb:UpdateItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["rquota#*"] }, { test = "ForAllValues:StringEquals", variable = "dynamodb:Attributes", values = ["pk", "sk", "bytes", "ttl"] }] },
      { actions = ["dynamodb:UpdateItem"], resources = [aws_dynamodb_table.inventory.arn], conditions = [{ test = "ForAllValues:StringEquals", variable = "dynamodb:Attributes", values = ["id", "enrolled", "last_heartbeat", "offline"] }] },
      # reads what compute signed and stored; writes reports only (never a bundle; holds no key)
      { actions = ["s3:GetObject"], resources = ["${aws_s3_bucket.bundles.arn}/bundles/*", "${aws_s3_bucket.bundles.arn}/deltas/*", "${aws_s3_bucket.bundles.arn}/keys/*", "${aws_s3_bucket.bundles.arn}/policies/*", "${aws_s3_bucket.bundles.arn}/agent/*"] },
      { actions = ["s3:PutObject"], resources = ["${aws_s3_bucket.bundles.arn}/reports/*"] },
      { actions = ["sqs:SendMessage"], resources = [aws_sqs_queue.compute.arn, aws_sqs_queue.async_dlq.arn] },
      # enrollments and token issuance are audited; aws-sts checks the instance profile's role and
      # that the role's trust policy admits EC2 alone (so that EC2 named the session)
      { actions = ["dynamodb:GetItem", "dynamodb:PutItem"], resources = [aws_dynamodb_table.audit.arn] },
      { actions = ["iam:GetInstanceProfile"], resources = ["arn:${local.partition}:iam::${local.account}:instance-profile/*"] },
      { actions = ["iam:GetRole"], resources = ["arn:${local.partition}:iam::${local.account}:role/*"] },
      local.describe, local.assume, local.kms_use,
    ]
    admin = [
      { actions = ["dynamodb:GetItem", "dynamodb:PutItem"], resources = [aws_dynamodb_table.audit.arn] },
      { actions = ["dynamodb:GetItem"], resources = [aws_dynamodb_table.state.arn] },
      # writes: the partitions its code writes only (tests/aws/test_sg_record_writers.py), never
      # a security group's record (sg#: the perimeter's alone), a token or a key binding
      { actions = ["dynamodb:PutItem", "dynamodb:UpdateItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["policy", "quarantine", "pairing#*", "pairingof#*", "nextkey#*", "addrowner#*"] }] },
      # modes updated in place; a quarantine's record checked, a release's cleared
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem", "dynamodb:ConditionCheckItem"], resources = [aws_dynamodb_table.inventory.arn] },
      # a release deletes the quarantine item; an agent-key reset drops the key binding, the
      # token, the nudge connection and the workload's pairing keys (found by the Query below);
      # an on-premise workload's addresses are released
      { actions = ["dynamodb:DeleteItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["quarantine", "pairing#*", "pairingof#*", "nextkey#*", "agentkey#*", "token#*", "tokenof#*", "conn#*", "addrowner#*"] }] },
      # the dependency map: the running inventory and the flow rows
      { actions = ["dynamodb:Scan"], resources = [aws_dynamodb_table.inventory.arn] },
      # BatchGetItem: GET /admin/findings reads the bundles' set heads
      { actions = ["dynamodb:Query", "dynamodb:BatchGetItem"], resources = [aws_dynamodb_table.state.arn] },
      { actions = ["s3:PutObject", "s3:GetObject"], resources = ["${aws_s3_bucket.bundles.arn}/policies/*"] },
      # the priority lane is the administrator's alone (its urgent compute work)
      { actions = ["sqs:SendMessage"], resources = [aws_sqs_queue.compute.arn, aws_sqs_queue.compute_priority.arn, aws_sqs_queue.async_dlq.arn] },
      local.kms_use,
    ]
    # agents' report batches (reports/) and VPC Flow Logs → classified flow rows (docs/visibility.md)
    flows = [
      { actions = ["dynamodb:Scan"], resources = [aws_dynamodb_table.inventory.arn] },
      { actions = ["dynamodb:GetItem", "dynamodb:Query"], resources = [aws_dynamodb_table.state.arn] },
      # fed by agents' report objects: writes its flow rows and address history only (never the
      # active policy, a bundle pointer, a token or an agent key)
      { actions = ["dynamodb:UpdateItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["flows#*"] }] },
      { actions = ["dynamodb:BatchWriteItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["addr#*"] }] },
      { actions = ["s3:GetObject"], resources = concat(["${aws_s3_bucket.bundles.arn}/reports/*", "${aws_s3_bucket.bundles.arn}/policies/*"], var.flow_log_bucket_name == "" ? [] : ["arn:${local.partition}:s3:::${var.flow_log_bucket_name}/*"]) },
      local.async_dlq, local.kms_use,
    ]
    gcpevents = [
      # fed by Pub/Sub pushes: never the active policy, a bundle pointer, a token or an agent key
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query"], resources = [aws_dynamodb_table.state.arn] },
      local.retire, local.gcp_once,
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Scan"], resources = [aws_dynamodb_table.inventory.arn] },
      local.observe, local.quarantine_put, local.record_check, local.counted_put, local.owed_mark_gcpevents,
      # governance findings, approvals and retired credentials are audited
      { actions = ["dynamodb:GetItem", "dynamodb:PutItem"], resources = [aws_dynamodb_table.audit.arn] },
      { actions = ["sqs:SendMessage"], resources = [aws_sqs_queue.compute.arn, aws_sqs_queue.async_dlq.arn] },
      local.policies_read, local.kms_use,
    ]
    azureevents = concat([
      # fed by Event Grid: never the active policy, a bundle pointer, a token or an agent key
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query"], resources = [aws_dynamodb_table.state.arn] },
      local.retire,
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Scan"], resources = [aws_dynamodb_table.inventory.arn] },
      local.observe, local.quarantine_put, local.record_check, local.counted_put, local.owed_mark_azureevents,
      { actions = ["dynamodb:GetItem", "dynamodb:PutItem"], resources = [aws_dynamodb_table.audit.arn] },
      { actions = ["sqs:SendMessage"], resources = [aws_sqs_queue.compute.arn, aws_sqs_queue.async_dlq.arn] },
      local.policies_read, local.kms_use,
    ], length(local.azure_secrets) == 0 ? [] : [{ actions = ["secretsmanager:GetSecretValue"], resources = local.azure_secrets }])
    # reads only the credentials secret (never the Event Grid one: it takes no deliveries)
    cloudreconcile = concat([
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query"], resources = [aws_dynamodb_table.state.arn] },
      local.retire, local.gcp_once,
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Scan"], resources = [aws_dynamodb_table.inventory.arn] },
      local.observe, local.quarantine_put, local.record_check, local.owed_mark_cloudreconcile, local.owed_drain,
      { actions = ["dynamodb:GetItem", "dynamodb:PutItem"], resources = [aws_dynamodb_table.audit.arn] },
      { actions = ["sqs:SendMessage"], resources = [aws_sqs_queue.compute.arn, aws_sqs_queue.async_dlq.arn] },
      local.policies_read, local.kms_use,
    ], try(var.azure.credentials_secret_arn, "") == "" ? [] : [{ actions = ["secretsmanager:GetSecretValue"], resources = [var.azure.credentials_secret_arn] }])
    # the chain's head item and the records since the last anchor (no write in the audit table);
    # the anchors' prefix only
    anchor = [
      { actions = ["dynamodb:GetItem"], resources = [aws_dynamodb_table.audit.arn], conditions = [{ test = "ForAllValues:StringEquals", variable = "dynamodb:LeadingKeys", values = ["head"] }] },
      { actions = ["dynamodb:Query"], resources = [aws_dynamodb_table.audit.arn], conditions = [{ test = "ForAllValues:StringEquals", variable = "dynamodb:LeadingKeys", values = ["chain"] }] },
      { actions = ["s3:ListBucket"], resources = [aws_s3_bucket.anchors.arn], conditions = [{ test = "StringLike", variable = "s3:prefix", values = ["anchors/*"] }] },
      { actions = ["s3:PutObject"], resources = ["${aws_s3_bucket.anchors.arn}/anchors/*"] },
      local.async_dlq, local.kms_use,
    ]
    wsconnect = [
      # no authorizer in front of $connect: writes its connection item only
      # BatchGetItem: a record is read with its quarantine item (DynamoStore.get_many)
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem"], resources = [aws_dynamodb_table.state.arn] },
      { actions = ["dynamodb:PutItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["conn#*"] }] },
      # in the same transaction, the check that the token is still the workload's current one
      { actions = ["dynamodb:ConditionCheckItem"], resources = [aws_dynamodb_table.state.arn], conditions = [{ test = "ForAllValues:StringLike", variable = "dynamodb:LeadingKeys", values = ["tokenof#*"] }] },
      { actions = ["dynamodb:GetItem", "dynamodb:BatchGetItem"], resources = [aws_dynamodb_table.inventory.arn] },
      { actions = ["dynamodb:GetItem", "dynamodb:PutItem"], resources = [aws_dynamodb_table.audit.arn] },
      local.async_dlq, local.kms_use,
    ]
  }
}

resource "aws_lambda_layer_version" "core" {
  layer_name               = "${var.name}-core"
  description              = "the ringfence library and its dependencies"
  filename                 = var.core_layer_zip
  source_code_hash         = filebase64sha256(var.core_layer_zip)
  compatible_runtimes      = ["python3.11"]
  compatible_architectures = ["arm64"]
}

resource "aws_lambda_layer_version" "azure" {
  count                    = var.azure == null ? 0 : 1
  layer_name               = "${var.name}-azure"
  description              = "the Azure SDKs of the Azure events function and azure-attested enrollment (layers/azure)"
  filename                 = var.azure.layer_zip
  source_code_hash         = filebase64sha256(var.azure.layer_zip)
  compatible_runtimes      = ["python3.11"]
  compatible_architectures = ["arm64"]
}

resource "aws_lambda_layer_version" "gcp" {
  count                    = var.gcp == null ? 0 : 1
  layer_name               = "${var.name}-gcp"
  description              = "the Google Cloud SDKs of the GCP events function (layers/gcp)"
  filename                 = var.gcp.layer_zip
  source_code_hash         = filebase64sha256(var.gcp.layer_zip)
  compatible_runtimes      = ["python3.11"]
  compatible_architectures = ["arm64"]
}

data "archive_file" "fn" {
  for_each    = local.all_functions
  type        = "zip"
  source_dir  = "${local.functions_dir}/${each.key}"
  output_path = "${path.module}/.build/${each.key}.zip"
}

data "aws_iam_policy_document" "assume_lambda" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "fn" {
  for_each           = local.all_functions
  name               = "${var.name}-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.assume_lambda.json
  tags               = var.tags
}

data "aws_iam_policy_document" "fn" {
  for_each = local.all_functions
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.fn[each.key].arn}:*"]
  }
  statement {
    sid       = "Tracing"
    actions   = ["xray:PutTraceSegments", "xray:PutTelemetryRecords"]
    resources = ["*"]
  }
  # the functions that write audit records or receive agents' reports send them to the SIEM
  # target too (siem.tf); no other function may
  dynamic "statement" {
    for_each = var.siem_target == "eventbridge" && contains(local.siem_writers, each.key) ? [1] : []
    content {
      sid       = "Siem"
      actions   = ["events:PutEvents"]
      resources = [aws_cloudwatch_event_bus.siem[0].arn]
    }
  }
  dynamic "statement" {
    for_each = var.siem_target == "cloudwatch" && contains(local.siem_writers, each.key) ? [1] : []
    content {
      sid       = "Siem"
      actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
      resources = ["${aws_cloudwatch_log_group.siem[0].arn}:*"]
    }
  }
  dynamic "statement" {
    for_each = local.statements[each.key]
    content {
      actions   = statement.value.actions
      resources = statement.value.resources
      dynamic "condition" {
        for_each = try(statement.value.conditions, [])
        content {
          test     = condition.value.test
          variable = condition.value.variable
          values   = condition.value.values
        }
      }
    }
  }
}

resource "aws_iam_role_policy" "fn" {
  #checkov:skip=CKV_AWS_355:ec2:Describe* and xray:Put* support no resource-level permissions
  #checkov:skip=CKV_AWS_290:ec2:Describe* and xray:Put* support no resource-level permissions
  for_each = local.all_functions
  name     = "${var.name}-${each.key}"
  role     = aws_iam_role.fn[each.key].id
  policy   = data.aws_iam_policy_document.fn[each.key].json
}

resource "aws_cloudwatch_log_group" "fn" {
  for_each          = local.all_functions
  name              = "/aws/lambda/${var.name}-${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.this.arn
  tags              = var.tags
}

resource "aws_lambda_function" "fn" {
  #checkov:skip=CKV_AWS_117:the functions call only AWS APIs; there is nothing in a VPC to reach
  #checkov:skip=CKV_AWS_272:code signing needs a Signer profile per deployment; see docs/deploy-aws.md
  for_each                       = local.all_functions
  function_name                  = "${var.name}-${each.key}"
  role                           = aws_iam_role.fn[each.key].arn
  runtime                        = "python3.11"
  architectures                  = ["arm64"]
  handler                        = "app.handler"
  filename                       = data.archive_file.fn[each.key].output_path
  source_code_hash               = data.archive_file.fn[each.key].output_base64sha256
  memory_size                    = each.value.memory
  timeout                        = each.value.timeout
  reserved_concurrent_executions = each.value.concurrency
  layers                         = concat([aws_lambda_layer_version.core.arn], lookup(local.cloud_layers, each.key, []))
  kms_key_arn                    = aws_kms_key.this.arn
  tracing_config {
    mode = "Active"
  }
  dead_letter_config {
    target_arn = aws_sqs_queue.async_dlq.arn
  }
  environment {
    variables = merge(local.common_env, each.value.env)
  }
  depends_on = [aws_iam_role_policy.fn, aws_cloudwatch_log_group.fn]
  tags       = var.tags
}

resource "aws_lambda_event_source_mapping" "sqs" {
  for_each = {
    ingest    = { queue = aws_sqs_queue.ingest.arn, window = 2 }
    lifecycle = { queue = aws_sqs_queue.lifecycle.arn, window = 0 }
    compute   = { queue = aws_sqs_queue.compute.arn, window = 0 }
    # the same function (concurrency 1) reads its priority lane too: Lambda polls each mapping on
    # its own, so an urgent message waits for the invocation under way, not the compute queue's backlog
    compute_priority = { queue = aws_sqs_queue.compute_priority.arn, window = 0 }
    perimeter        = { queue = aws_sqs_queue.perimeter.arn, window = 0 }
    publish          = { queue = aws_sqs_queue.publish.arn, window = 0 }
  }
  event_source_arn                   = each.value.queue
  function_name                      = aws_lambda_function.fn[each.key == "compute_priority" ? "compute" : each.key].arn
  batch_size                         = 10
  maximum_batching_window_in_seconds = startswith(each.key, "compute") ? null : each.value.window
  function_response_types            = ["ReportBatchItemFailures"]
  # the publish workers share the WebSocket API's post rate and the bucket: bounded fan-out
  dynamic "scaling_config" {
    for_each = each.key == "publish" ? [50] : []
    content {
      maximum_concurrency = scaling_config.value
    }
  }
}

resource "aws_cloudwatch_event_rule" "schedule" {
  for_each = merge(
    { reconcile = var.reconcile_schedule, perimeter = "rate(30 minutes)", anchor = var.audit_anchor_schedule },
    { for k in keys(local.cloud_functions) : k => var.reconcile_schedule },
  )
  name                = "${var.name}-${each.key}-schedule"
  schedule_expression = each.value
  tags                = var.tags
}

resource "aws_cloudwatch_event_target" "schedule" {
  for_each = aws_cloudwatch_event_rule.schedule
  rule     = each.value.name
  arn      = aws_lambda_function.fn[each.key].arn
}

resource "aws_lambda_permission" "schedule" {
  for_each      = aws_cloudwatch_event_rule.schedule
  statement_id  = "schedule"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.fn[each.key].function_name
  principal     = "events.amazonaws.com"
  source_arn    = each.value.arn
}

# S3 object-created events (EventBridge notifications) → the flows function: agents' report
# batches in the bundle bucket, and VPC Flow Logs in var.flow_log_bucket_name when set
resource "aws_s3_bucket_notification" "bundles" {
  bucket      = aws_s3_bucket.bundles.id
  eventbridge = true
}

resource "aws_cloudwatch_event_rule" "flows" {
  for_each = merge(
    { reports = { bucket = { name = [aws_s3_bucket.bundles.id] }, object = { key = [{ prefix = "reports/" }] } } },
    var.flow_log_bucket_name == "" ? {} : { flowlogs = { bucket = { name = [var.flow_log_bucket_name] } } },
  )
  name = "${var.name}-flows-${each.key}"
  event_pattern = jsonencode({
    source        = ["aws.s3"]
    "detail-type" = ["Object Created"]
    detail        = each.value
  })
  tags = var.tags
}

resource "aws_cloudwatch_event_target" "flows" {
  for_each = aws_cloudwatch_event_rule.flows
  rule     = each.value.name
  arn      = aws_lambda_function.fn["flows"].arn
}

resource "aws_lambda_permission" "flows" {
  for_each      = aws_cloudwatch_event_rule.flows
  statement_id  = "flows-${each.key}"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.fn["flows"].function_name
  principal     = "events.amazonaws.com"
  source_arn    = each.value.arn
}
