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

output "alarm_topic_arn" {
  value = aws_sns_topic.alarms.arn
}
