resource "aws_sns_topic" "alarms" {
  name              = "${var.name}-alarms"
  kms_master_key_id = aws_kms_key.this.arn
  tags              = var.tags
}

locals {
  alarms = {
    ingest-dlq              = { ns = "AWS/SQS", metric = "ApproximateNumberOfMessagesVisible", stat = "Maximum", dims = { QueueName = aws_sqs_queue.ingest_dlq.name }, what = "events ingest could not process are in the DLQ" }
    lifecycle-dlq           = { ns = "AWS/SQS", metric = "ApproximateNumberOfMessagesVisible", stat = "Maximum", dims = { QueueName = aws_sqs_queue.lifecycle_dlq.name }, what = "lifecycle actions failed repeatedly" }
    compute-dlq             = { ns = "AWS/SQS", metric = "ApproximateNumberOfMessagesVisible", stat = "Maximum", dims = { QueueName = aws_sqs_queue.compute_dlq.name }, what = "compute batches failed repeatedly" }
    publish-dlq             = { ns = "AWS/SQS", metric = "ApproximateNumberOfMessagesVisible", stat = "Maximum", dims = { QueueName = aws_sqs_queue.publish_dlq.name }, what = "publish jobs failed repeatedly (those bundles are not signed or announced)" }
    publish-errors          = { ns = "AWS/Lambda", metric = "Errors", stat = "Sum", dims = { FunctionName = aws_lambda_function.fn["publish"].function_name }, what = "publish crashed or timed out (handled failures: publish-failures)" }
    publish-failures        = { ns = "Ringfence", metric = "PublishFailures", stat = "Sum", dims = { service = "ringfence" }, what = "publish failed a job and handed it back for a retry" }
    staged-refused          = { ns = "Ringfence", metric = "StagedBundlesRefused", stat = "Sum", dims = { service = "ringfence" }, what = "publish refused a staged bundle: its bytes are not those whose SHA-256 compute put in the job, or not the job's bundle (never signed; the job is retried, then the publish DLQ). Possible tampering with the staging bucket: investigate (its access log names the writer; the copy is kept). Counted per attempt, not per bundle: each retry of the job counts again. Jobs queued before an upgrade to hashed staging are refused alike" }
    perimeter-dlq           = { ns = "AWS/SQS", metric = "ApproximateNumberOfMessagesVisible", stat = "Maximum", dims = { QueueName = aws_sqs_queue.perimeter_dlq.name }, what = "perimeter messages failed repeatedly (their launches time out)" }
    perimeter-refused       = { ns = "Ringfence", metric = "PerimeterPlanRefused", stat = "Sum", dims = { service = "ringfence" }, what = "a perimeter plan was refused (quota, or a name held by a foreign group): nothing changed" }
    perimeter-failed        = { ns = "Ringfence", metric = "PerimeterPlacesFailed", stat = "Sum", dims = { service = "ringfence" }, what = "the perimeter could not reconcile an account/region (its perimeter role, STS or EC2 failed); the others were reconciled, that place's launches wait for a retry" }
    perimeter-unowned       = { ns = "Ringfence", metric = "PerimeterGroupsRefused", stat = "Sum", dims = { service = "ringfence" }, what = "a security group carries the ringfence:perimeter tag and a Ringfence name but Ringfence has no record of creating it (a look-alike, or one made before records that is not exactly what Ringfence makes); never attached, the interfaces needing that name are left as they are" }
    reconcile-failed        = { ns = "Ringfence", metric = "ReconcileTargetsFailed", stat = "Sum", dims = { service = "ringfence" }, what = "reconcile could not read an account/region (its member role, STS or EC2 failed): its drift was not converged" }
    reconcile-refused       = { ns = "Ringfence", metric = "ReconcileTargetsRefused", stat = "Sum", dims = { service = "ringfence" }, what = "a reconcile target's account is in no account_roles (and not this one): it is never read" }
    gcp-reconcile           = { ns = "Ringfence", metric = "GcpReconcileFailed", stat = "Sum", dims = { service = "ringfence" }, what = "a scheduled GCP reconcile failed for a project: its inventory or firewall policy not brought up to date (never without GCP)" }
    azure-reconcile         = { ns = "Ringfence", metric = "AzureReconcileFailed", stat = "Sum", dims = { service = "ringfence" }, what = "a scheduled Azure reconcile failed for a subscription: its inventory or NSGs not brought up to date (never without Azure)" }
    gcp-unreachable         = { ns = "Ringfence", metric = "GcpZonesUnreachable", stat = "Sum", dims = { service = "ringfence" }, what = "a scheduled GCP reconcile could not list some zones: their VMs are looked up by id; one unconfirmed for a day (or whose address a listed VM holds) is recorded deleted (never without GCP)" }
    azure-malformed         = { ns = "Ringfence", metric = "AzureEventsMalformed", stat = "Sum", dims = { service = "ringfence" }, what = "an Event Grid delivery carried a malformed event: skipped (logged by index), its change waits for the next Azure reconcile (never without Azure)" }
    async-dlq               = { ns = "AWS/SQS", metric = "ApproximateNumberOfMessagesVisible", stat = "Maximum", dims = { QueueName = aws_sqs_queue.async_dlq.name }, what = "scheduled runs failed" }
    anchor-errors           = { ns = "AWS/Lambda", metric = "Errors", stat = "Sum", dims = { FunctionName = aws_lambda_function.fn["anchor"].function_name }, what = "the anchor function failed: the audit chain's head is not being anchored" }
    ingest-errors           = { ns = "AWS/Lambda", metric = "Errors", stat = "Sum", dims = { FunctionName = aws_lambda_function.fn["ingest"].function_name }, what = "ingest errors" }
    compute-errors          = { ns = "AWS/Lambda", metric = "Errors", stat = "Sum", dims = { FunctionName = aws_lambda_function.fn["compute"].function_name }, what = "compute crashed or timed out (handled failures: compute-failures)" }
    compute-failures        = { ns = "Ringfence", metric = "ComputeFailures", stat = "Sum", dims = { service = "ringfence" }, what = "compute failed a batch and handed it back for a retry" }
    ingest-throttles        = { ns = "AWS/Lambda", metric = "Throttles", stat = "Sum", dims = { FunctionName = aws_lambda_function.fn["ingest"].function_name }, what = "ingest throttled" }
    agentapi-throttles      = { ns = "AWS/Lambda", metric = "Throttles", stat = "Sum", dims = { FunctionName = aws_lambda_function.fn["agentapi"].function_name }, what = "agent API throttled" }
    lifecycle-unlisted      = { ns = "Ringfence", metric = "LifecycleHooksUnlisted", stat = "Sum", dims = { service = "ringfence" }, what = "a gated group's launch hook abandons launches under a name not in lifecycle_hook_names, and no launch hook of the group is in it (reconcile's log names it): Ringfence completes none of its actions" }
    compute-not-queued      = { ns = "Ringfence", metric = "ComputeNotQueued", stat = "Sum", dims = { service = "ringfence" }, what = "a change is stored but its compute message failed. An admin change (policy version, mode, quarantine or release, label grant, on-premise registration, CMDB import or deregistration) is answered 503 (the admin function's log names the audit record): bundles and peers' sets do not follow it until the same request is sent again. An event's or a scheduled run's change is marked owed in the state table and handed on by the next scheduled run (ComputeOwedNotMarked fires if the mark failed too)" }
    compute-owed-not-marked = { ns = "Ringfence", metric = "ComputeOwedNotMarked", stat = "Sum", dims = { service = "ringfence" }, what = "a hand-off to compute failed (ComputeNotQueued) and its workloads could not be marked owed in the state table either (the store failing with the queue; the failing function's log names them): no scheduled run hands them on, a tombstone is re-sent only within RINGFENCE_GONE_RESEND_WINDOW and any other change waits for a rebuild: once compute's queue takes messages, provision the active version's files again (docs/operations.md)" }
    owed-marks-malformed    = { ns = "Ringfence", metric = "OwedMarksMalformed", stat = "Sum", dims = { service = "ringfence" }, what = "owed marks in the state table whose key is no workload id were deleted unsent by a scheduled run (OwedMarksMalformed; the run's log names their partitions and one key, escaped): Ringfence writes none, and each owed#<function> partition is writable by that function's role alone (owed#serve: by ringfence serve's AWS credentials), so the function whose partition held them is failing or its role is in someone else's hands: investigate that role's use (CloudTrail) and its code (docs/operations.md)" }
    addresses-shared        = { ns = "Ringfence", metric = "AddressesShared", stat = "Sum", dims = { service = "ringfence" }, what = "compute found addresses more than one active workload holds (an instance launched with an on-premise host's address, overlapping VPCs; compute's log names each and its holders): peers' sets give such an address the access of each; deregister or re-address one. Counted at each compute run over them" }
    lifecycle-timeouts      = { ns = "Ringfence", metric = "LifecycleLeftToTimeout", stat = "Sum", dims = { service = "ringfence" }, what = "lifecycle hooks left to time out" }
    safeguards-lowered      = { ns = "Ringfence", metric = "SafeguardsLowered", stat = "Sum", dims = { service = "ringfence" }, what = "an admin lowered a safeguard (idle, release from quarantine, fail-safes widened): see the audit table" }
    terminate-refused       = { ns = "Ringfence", metric = "UnconfirmedTerminations", stat = "Sum", dims = { service = "ringfence" }, what = "a terminate lifecycle action Auto Scaling did not confirm was refused (forged or misrouted)" }
  }
}

resource "aws_cloudwatch_metric_alarm" "this" {
  for_each            = local.alarms
  alarm_name          = "${var.name}-${each.key}"
  alarm_description   = each.value.what
  namespace           = each.value.ns
  metric_name         = each.value.metric
  statistic           = each.value.stat
  dimensions          = each.value.dims
  period              = 60
  evaluation_periods  = 1
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  tags                = var.tags
}

# a schedule that stopped (disabled, deleted, the function's concurrency set to 0) fails nothing:
# no invocation of the anchor function for 3 hours is the alarm (missing data breaches)
resource "aws_cloudwatch_metric_alarm" "anchor_stopped" {
  alarm_name          = "${var.name}-anchor-stopped"
  alarm_description   = "the anchor function has not run for 3 hours: the audit chain's head is not being anchored"
  namespace           = "AWS/Lambda"
  metric_name         = "Invocations"
  statistic           = "Sum"
  dimensions          = { FunctionName = aws_lambda_function.fn["anchor"].function_name }
  period              = 3600
  evaluation_periods  = 3
  threshold           = 1
  comparison_operator = "LessThanThreshold"
  treat_missing_data  = "breaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  tags                = var.tags
}

# compute stuck or failing: the FIFO queue's oldest message keeps ageing (updates are late)
resource "aws_cloudwatch_metric_alarm" "compute_queue_age" {
  alarm_name          = "${var.name}-compute-queue-age"
  alarm_description   = "the oldest compute message waited over 10 minutes"
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateAgeOfOldestMessage"
  statistic           = "Maximum"
  dimensions          = { QueueName = aws_sqs_queue.compute.name }
  period              = 60
  evaluation_periods  = 3
  threshold           = 600
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  tags                = var.tags
}

# a backlog on the compute queue (compute has one invocation at a time, ten messages each): a
# storm of tag or registration changes puts work ahead of every ordinary change for
# ceil(depth / 10) invocations (docs/operations.md: what to do)
resource "aws_cloudwatch_metric_alarm" "compute_queue_depth" {
  alarm_name          = "${var.name}-compute-queue-depth"
  alarm_description   = "over 500 compute messages waited for 3 minutes: a backlog of ordinary changes (a possible cause: a tag storm, someone flapping the tags of instances they may tag, or a registration flood); administrators' changes take the priority queue, the rest waits ceil(depth / 10) compute invocations (docs/operations.md)"
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  statistic           = "Maximum"
  dimensions          = { QueueName = aws_sqs_queue.compute.name }
  period              = 60
  evaluation_periods  = 3
  threshold           = 500
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  tags                = var.tags
}

# the priority lane (quarantines, modes, bindings, policies) waits at most one compute invocation:
# a minute of age means compute is stuck, failing, or the lane itself is flooded
resource "aws_cloudwatch_metric_alarm" "compute_priority_queue_age" {
  alarm_name          = "${var.name}-compute-priority-queue-age"
  alarm_description   = "the oldest urgent compute message (a quarantine, a mode, a binding, a policy) waited over 60 s: compute stuck or failing, or the priority lane flooded (a possible cause: a storm of administrators' changes); an incident responder's quarantine is late (docs/operations.md)"
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateAgeOfOldestMessage"
  statistic           = "Maximum"
  dimensions          = { QueueName = aws_sqs_queue.compute_priority.name }
  period              = 60
  evaluation_periods  = 1
  threshold           = 60
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  tags                = var.tags
}

# the publish workers throttled or failing: their standard queue's oldest job keeps ageing
resource "aws_cloudwatch_metric_alarm" "publish_queue_age" {
  alarm_name          = "${var.name}-publish-queue-age"
  alarm_description   = "the oldest publish job waited over 5 minutes (agents are late)"
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateAgeOfOldestMessage"
  statistic           = "Maximum"
  dimensions          = { QueueName = aws_sqs_queue.publish.name }
  period              = 60
  evaluation_periods  = 3
  threshold           = 300
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  tags                = var.tags
}
