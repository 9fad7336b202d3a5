# --- SIEM output (docs/visibility.md) ------------------------------------------------------------
# Audit records, agents' drops and findings as OCSF 1.7.0 JSON to the stack's own EventBridge bus
# (add rules that forward to your SIEM) or CloudWatch Logs group (subscribe your SIEM to it).

locals {
  # the functions that write audit records or receive agents' reports (lambda.tf's statements)
  siem_writers = ["ingest", "lifecycle", "reconcile", "agentapi", "admin", "gcpevents", "azureevents", "wsconnect", "cloudreconcile", "perimeter"]
  siem_spec = (
    var.siem_target == "eventbridge" ? "eventbridge:${aws_cloudwatch_event_bus.siem[0].name}" :
    var.siem_target == "cloudwatch" ? "cloudwatch:${aws_cloudwatch_log_group.siem[0].name}" : ""
  )
}

resource "aws_cloudwatch_event_bus" "siem" {
  count = var.siem_target == "eventbridge" ? 1 : 0
  name  = "${var.name}-siem"
  tags  = var.tags
}

resource "aws_cloudwatch_log_group" "siem" {
  count             = var.siem_target == "cloudwatch" ? 1 : 0
  name              = "/ringfence/${var.name}/siem"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.this.arn
  tags              = var.tags
}
