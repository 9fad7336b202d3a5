output "agent_api_url" {
  description = "Agents enroll and fetch bundles here (the agent's api_url)."
  value       = module.ringfence.agent_api_url
}

output "admin_api_url" {
  description = "The admin API (IAM auth): provision policy, modes, quarantine, pairing keys."
  value       = module.ringfence.admin_api_url
}

output "nudge_url" {
  description = "The optional WebSocket nudge channel."
  value       = module.ringfence.nudge_url
}

output "bundle_bucket" {
  value = module.ringfence.bundle_bucket
}

output "alarm_topic_arn" {
  description = "Subscribe to this SNS topic to receive the stack's alarms."
  value       = module.ringfence.alarm_topic_arn
}

output "signing_key_arns" {
  description = "The bundle signing key of each slot: fetch its public key for the agents' key set (README.md)."
  value       = module.ringfence.signing_key_arns
}

output "compute_role_arn" {
  description = "The compute function's role, the one principal the member lifecycle role (member_lifecycle_role_name) trusts."
  value       = module.ringfence.compute_role_arn
}

output "perimeter_role_arn" {
  description = "The perimeter function's role, the one principal the member perimeter role (member_perimeter_role_name) trusts; list it in the label guard's perimeter_principal_arns."
  value       = module.ringfence.perimeter_role_arn
}
