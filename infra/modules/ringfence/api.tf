# --- agent REST API (docs/agent-api.md) and IAM-authenticated admin API -------------------------

locals {
  agent_routes = {
    "/v1/nonce"                 = ["get"]
    "/v1/enroll"                = ["post"]
    "/v1/agents/{id}/token"     = ["post"]
    "/v1/agents/{id}/bundle"    = ["get"]
    "/v1/agents/{id}/deltas"    = ["get"]
    "/v1/agents/{id}/wait"      = ["get"]
    "/v1/agents/{id}/heartbeat" = ["post"]
    "/v1/agents/{id}/reports"   = ["post"]
    "/v1/agent/{name}"          = ["get"]
  }
  admin_routes = {
    "/admin/policies"                    = ["post"]
    "/admin/map"                         = ["get"]
    "/admin/suggest"                     = ["get"]
    "/admin/findings"                    = ["get"]
    "/admin/workloads/{id}/mode"         = ["put"]
    "/admin/workloads/{id}/labels"       = ["put", "delete"]
    "/admin/workloads/{id}/quarantine"   = ["post", "delete"]
    "/admin/workloads/{id}/agent-key"    = ["delete"]
    "/admin/workloads/{id}/pairing-keys" = ["delete"]
    "/admin/pairing-keys"                = ["post"]
    # on-premise workloads (docs/onprem.md): registered here, enrolled with pairing keys
    "/admin/workloads"        = ["post"]
    "/admin/workloads/import" = ["post"]
    "/admin/workloads/{id}"   = ["delete"]
  }
  # GCP audit-log events (Pub/Sub push, Eventarc): their own API, only with var.gcp
  gcp_routes = {
    "/gcp/events" = ["post"]
  }
  # Azure Event Grid deliveries: their own API, only with var.azure
  azure_routes = {
    "/azure/events" = ["post"]
  }
  apis = merge({
    agent = { routes = local.agent_routes, fn = "agentapi", auth = false, rate = 500, burst = 1000 }
    admin = { routes = local.admin_routes, fn = "admin", auth = true, rate = 10, burst = 20 }
    }, var.gcp == null ? {} : { gcp = { routes = local.gcp_routes, fn = "gcpevents", auth = false, rate = 50, burst = 100 } },
  var.azure == null ? {} : { azure = { routes = local.azure_routes, fn = "azureevents", auth = false, rate = 50, burst = 100 } })
}

resource "aws_api_gateway_rest_api" "this" {
  for_each = local.apis
  name     = "${var.name}-${each.key}"
  # the agent wheel (GET /v1/agent/{name}) is answered base64-encoded: bytes for Accept: application/octet-stream
  binary_media_types = each.key == "agent" ? ["application/octet-stream"] : []
  endpoint_configuration {
    types = ["REGIONAL"]
  }
  body = jsonencode({
    openapi = "3.0.1"
    info    = { title = "${var.name}-${each.key}", version = "1" }
    components = each.value.auth ? {
      securitySchemes = {
        sigv4 = { type = "apiKey", name = "Authorization", in = "header", "x-amazon-apigateway-authtype" = "awsSigv4" }
      }
    } : {}
    paths = { for path, methods in each.value.routes : path => { for m in methods : m => merge(
      {
        "x-amazon-apigateway-integration" = {
          type       = "aws_proxy"
          httpMethod = "POST"
          uri        = aws_lambda_function.fn[each.value.fn].invoke_arn
        }
      },
      each.value.auth ? { security = [{ sigv4 = [] }] } : {}
    ) } }
  })
  lifecycle {
    create_before_destroy = true
  }
  tags = var.tags
}

# only the admin roles reach the admin function at all; which action each may take is the
# function's check (var.admin_roles)
data "aws_iam_policy_document" "admin_api" {
  statement {
    actions   = ["execute-api:Invoke"]
    resources = ["${aws_api_gateway_rest_api.this["admin"].execution_arn}/*"]
    principals {
      type        = "AWS"
      identifiers = keys(var.admin_roles)
    }
  }
  statement {
    effect    = "Deny"
    actions   = ["execute-api:Invoke"]
    resources = ["${aws_api_gateway_rest_api.this["admin"].execution_arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "ArnNotEquals"
      variable = "aws:PrincipalArn"
      values   = keys(var.admin_roles)
    }
  }
}

resource "aws_api_gateway_rest_api_policy" "admin" {
  rest_api_id = aws_api_gateway_rest_api.this["admin"].id
  policy      = data.aws_iam_policy_document.admin_api.json
}

resource "aws_api_gateway_deployment" "this" {
  for_each    = local.apis
  rest_api_id = aws_api_gateway_rest_api.this[each.key].id
  triggers = {
    redeploy = sha1(aws_api_gateway_rest_api.this[each.key].body)
    policy   = each.key == "admin" ? sha1(data.aws_iam_policy_document.admin_api.json) : ""
  }
  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_cloudwatch_log_group" "api" {
  name              = "/aws/apigateway/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.this.arn
  tags              = var.tags
}

resource "aws_api_gateway_stage" "this" {
  #checkov:skip=CKV_AWS_120:bundles change on every event and admin calls are writes; caching would serve stale policy
  #checkov:skip=CKV2_AWS_29:the agent stage has its web ACL (aws_wafv2_web_acl.agent: a per-IP rate on the routes without a bearer token); admin is IAM-authorized by resource policy; the GCP and Azure event routes check each push's token or signature (add a web ACL of your own there if needed)
  #checkov:skip=CKV2_AWS_51:mutual TLS to the backend does not apply to Lambda proxy integrations
  #checkov:skip=CKV2_AWS_77:no Java behind these APIs (Lambda in Python): the agent stage's web ACL rate-limits, it needs no Log4j rule set
  for_each             = local.apis
  rest_api_id          = aws_api_gateway_rest_api.this[each.key].id
  deployment_id        = aws_api_gateway_deployment.this[each.key].id
  stage_name           = "v1"
  xray_tracing_enabled = true
  access_log_settings {
    destination_arn = aws_cloudwatch_log_group.api.arn
    format = jsonencode({
      requestId = "$context.requestId", caller = "$context.identity.userArn", ip = "$context.identity.sourceIp",
      method    = "$context.httpMethod", path = "$context.path", status = "$context.status"
    })
  }
  tags = var.tags
}

# GET /v1/nonce, POST /v1/enroll and the token route take no bearer token: one address sending more
# than var.agent_api_unauthenticated_requests_per_ip of them in 5 minutes is blocked here, before a
# function runs or a nonce is written, instead of taking the stage's per-method throttle from every
# agent (docs/threat-model.md, "Anyone who can reach the agent API"). Not a renewal by token: hosts
# behind one NAT would lose theirs to one process flooding GET /v1/nonce.
resource "aws_wafv2_web_acl" "agent" {
  #checkov:skip=CKV_AWS_192:no Java behind this API (Lambda in Python); its routes validate their bodies
  #checkov:skip=CKV2_AWS_31:sampled requests and CloudWatch metrics kept; the stage's access log names every caller's address
  name  = "${var.name}-agent-api"
  scope = "REGIONAL"
  default_action {
    allow {}
  }
  # a renewal by token (POST .../token with a bearer) is labelled, and the rate rule leaves it out:
  # the control plane takes such a request as that renewal or nothing, refused after one read
  # unless the bearer is the workload's current token (a nonce is never burnt for it)
  rule {
    name     = "renewal-by-token"
    priority = 0
    action {
      count {}
    }
    rule_label {
      name = "ringfence:renewal-by-token"
    }
    statement {
      and_statement {
        statement {
          byte_match_statement {
            positional_constraint = "EXACTLY"
            search_string         = "POST"
            field_to_match {
              method {}
            }
            text_transformation {
              priority = 0
              type     = "NONE"
            }
          }
        }
        statement {
          regex_match_statement {
            regex_string = "/agents/[^/]+/token/*$"
            field_to_match {
              uri_path {}
            }
            text_transformation {
              priority = 0
              type     = "URL_DECODE"
            }
          }
        }
        statement {
          byte_match_statement {
            positional_constraint = "STARTS_WITH"
            search_string         = "Bearer "
            field_to_match {
              single_header {
                name = "authorization"
              }
            }
            text_transformation {
              priority = 0
              type     = "NONE"
            }
          }
        }
      }
    }
    visibility_config {
      sampled_requests_enabled   = true
      cloudwatch_metrics_enabled = true
      metric_name                = "ringfence-agent-api-renewal-by-token"
    }
  }
  rule {
    name     = "unauthenticated-routes-per-ip"
    priority = 1
    # 429 and Retry-After (the rate window), not a plain 403: agents take it for throttling and go
    # on calling with a token they hold
    action {
      block {
        custom_response {
          response_code = 429
          response_header {
            name  = "Retry-After"
            value = "300"
          }
        }
      }
    }
    statement {
      rate_based_statement {
        limit              = var.agent_api_unauthenticated_requests_per_ip
        aggregate_key_type = "IP"
        scope_down_statement {
          and_statement {
            statement {
              # the paths' ends, whatever stage or base path precedes them (a trailing slash too)
              regex_match_statement {
                regex_string = "/(nonce|enroll|token)/*$"
                field_to_match {
                  uri_path {}
                }
                text_transformation {
                  priority = 0
                  type     = "URL_DECODE"
                }
              }
            }
            statement {
              not_statement {
                statement {
                  label_match_statement {
                    scope = "LABEL"
                    key   = "ringfence:renewal-by-token"
                  }
                }
              }
            }
          }
        }
      }
    }
    visibility_config {
      sampled_requests_enabled   = true
      cloudwatch_metrics_enabled = true
      metric_name                = "ringfence-agent-api-unauthenticated-per-ip"
    }
  }
  visibility_config {
    sampled_requests_enabled   = true
    cloudwatch_metrics_enabled = true
    metric_name                = "ringfence-agent-api"
  }
  tags = var.tags
}

resource "aws_wafv2_web_acl_association" "agent" {
  resource_arn = aws_api_gateway_stage.this["agent"].arn
  web_acl_arn  = aws_wafv2_web_acl.agent.arn
}

resource "aws_api_gateway_method_settings" "this" {
  #checkov:skip=CKV_AWS_225:caching is disabled on purpose (see the stage)
  for_each    = local.apis
  rest_api_id = aws_api_gateway_rest_api.this[each.key].id
  stage_name  = aws_api_gateway_stage.this[each.key].stage_name
  method_path = "*/*"
  settings {
    logging_level          = each.key == "admin" ? "INFO" : "ERROR"
    metrics_enabled        = true
    throttling_rate_limit  = each.value.rate
    throttling_burst_limit = each.value.burst
  }
}

resource "aws_lambda_permission" "api" {
  for_each      = local.apis
  statement_id  = "api-${each.key}"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.fn[each.value.fn].function_name
  principal     = "apigateway.amazonaws.com"
  source_arn    = "${aws_api_gateway_rest_api.this[each.key].execution_arn}/*/*"
}

# --- WebSocket nudge channel ------------------------------------------------------------------------

resource "aws_apigatewayv2_api" "nudge" {
  name                       = "${var.name}-nudge"
  protocol_type              = "WEBSOCKET"
  route_selection_expression = "$request.body.action"
  tags                       = var.tags
}

resource "aws_apigatewayv2_integration" "nudge" {
  api_id           = aws_apigatewayv2_api.nudge.id
  integration_type = "AWS_PROXY"
  integration_uri  = aws_lambda_function.fn["wsconnect"].invoke_arn
}

resource "aws_apigatewayv2_route" "nudge" {
  #checkov:skip=CKV_AWS_309:the agent's bearer token is checked by the connect function
  for_each           = toset(["$connect", "$disconnect"])
  api_id             = aws_apigatewayv2_api.nudge.id
  route_key          = each.key
  authorization_type = "NONE"
  target             = "integrations/${aws_apigatewayv2_integration.nudge.id}"
}

resource "aws_apigatewayv2_stage" "nudge" {
  #checkov:skip=CKV2_AWS_51:client certificates do not apply to a WebSocket API in front of Lambda
  api_id      = aws_apigatewayv2_api.nudge.id
  name        = "v1"
  auto_deploy = true
  access_log_settings {
    destination_arn = aws_cloudwatch_log_group.api.arn
    format          = jsonencode({ requestId = "$context.requestId", route = "$context.routeKey", status = "$context.status" })
  }
  tags = var.tags
}

resource "aws_lambda_permission" "nudge" {
  statement_id  = "nudge"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.fn["wsconnect"].function_name
  principal     = "apigateway.amazonaws.com"
  source_arn    = "${aws_apigatewayv2_api.nudge.execution_arn}/*"
}
