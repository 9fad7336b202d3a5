output "agent_api_url" {
  value = aws_api_gateway_stage.this["agent"].invoke_url
}

output "admin_api_url" {
  value = aws_api_gateway_stage.this["admin"].invoke_url
}

output "nudge_url" {
  value = aws_apigatewayv2_stage.nudge.invoke_url
}

output "bundle_bucket" {
  value = aws_s3_bucket.bundles.id
}

output "audit_anchor_bucket" {
  description = "Where the anchor function writes the audit chain's head (ringfence audit verify --anchor s3://BUCKET/anchors/)."
  value       = aws_s3_bucket.anchors.id
}

output "alarm_topic_arn" {
  value = aws_sns_topic.alarms.arn
}

output "signing_key_arns" {
  description = "The signing key of each slot (aws kms get-public-key for the agents' key set); empty with signing_key_source = secret."
  value       = { for slot, key in aws_kms_key.signing : slot => key.arn }
}

output "active_signing_key" {
  description = "The key compute and publish sign with (RINGFENCE_SIGNING_KEY)."
  value       = local.signing_key_id
}

output "compute_role_arn" {
  description = "The compute function's role, the one principal the member lifecycle role (member_lifecycle_role_name) trusts."
  value       = aws_iam_role.fn["compute"].arn
}

output "perimeter_role_arn" {
  description = "The perimeter function's role, the one principal the member perimeter role (member_perimeter_role_name) trusts; list it in the label guard's perimeter_principal_arns."
  value       = aws_iam_role.fn["perimeter"].arn
}
