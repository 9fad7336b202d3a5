variable "name" {
  description = "Name prefix for every resource."
  type        = string
  default     = "ringfence"
}

variable "signing_key_source" {
  description = "Where the bundle signing key lives: kms (a non-exportable ECC_NIST_EDWARDS25519 key this module creates; kms:Sign for the compute role only) or secret (signing_key_secret_arn)."
  type        = string
  default     = "kms"
  validation {
    condition     = contains(["kms", "secret"], var.signing_key_source)
    error_message = "signing_key_source must be kms or secret."
  }
}

variable "signing_kms_keys" {
  description = "With signing_key_source = kms: which of the module's two signing-key slots hold a key. Rotation (docs/bundle.md, Keys and rotation): [\"a\"], then [\"a\", \"b\"] (pin b's public key in every agent), then active_signing_kms_key = \"b\", then [\"b\"] (a's deletion is scheduled); the next rotation goes back through both to a, a new key."
  type        = set(string)
  default     = ["a"]
  validation {
    condition     = length(var.signing_kms_keys) > 0 && alltrue([for k in var.signing_kms_keys : contains(["a", "b"], k)])
    error_message = "signing_kms_keys must hold a, b or both."
  }
}

variable "active_signing_kms_key" {
  description = "With signing_key_source = kms: the slot whose key compute and publish sign with; signing_kms_keys must hold it."
  type        = string
  default     = "a"
  validation {
    condition     = contains(["a", "b"], var.active_signing_kms_key)
    error_message = "active_signing_kms_key must be a or b."
  }
}

variable "signing_key_secret_arn" {
  description = "With signing_key_source = secret: the Secrets Manager secret holding the Ed25519 bundle signing key (PKCS#8 PEM); it gets a resource policy denying everyone but the compute role."
  type        = string
  default     = ""
}

variable "core_layer_zip" {
  description = "Path to the built core layer zip (python/ringfence + dependencies); infra/build-layer.sh produces it."
  type        = string
}

variable "iid_certificate" {
  description = "PEM of the AWS Region certificate that signs instance identity documents (RSA-SHA256 form)."
  type        = string
  default     = ""
}

variable "allowed_accounts" {
  description = "Accounts whose instances may enroll (empty: any)."
  type        = list(string)
  default     = []
}

variable "reconcile_targets" {
  description = "Accounts/regions to reconcile; role_arn null for this account."
  type = list(object({
    account  = string
    region   = string
    role_arn = optional(string)
  }))
  default = []
}

variable "account_roles" {
  description = "account id -> role ARN used by ingest to describe instances of member accounts."
  type        = map(string)
  default     = {}
}

variable "member_role_name" {
  description = "Name of the read-only role in member accounts that ingest, lifecycle, reconcile and the agent API may assume (describe only: never the perimeter's writes)."
  type        = string
  default     = "ringfence-member-readonly"
}

variable "perimeter_account_roles" {
  description = "account id -> the perimeter's role ARN in each member account whose perimeter Ringfence manages (security-group writes); only the perimeter function may assume it."
  type        = map(string)
  default     = {}
}

variable "member_perimeter_role_name" {
  description = "Name of the perimeter's role in member accounts (only the perimeter function may assume it)."
  type        = string
  default     = "ringfence-member-perimeter"
}

variable "member_lifecycle_role_name" {
  description = "Name of compute's role in member accounts (autoscaling:CompleteLifecycleAction on the gated groups only; only the compute function may assume it): member accounts' lifecycle actions are completed there (a member account without it: not completed, counted LifecycleLeftToTimeout)."
  type        = string
  default     = "ringfence-member-lifecycle"
  validation {
    condition     = can(regex("^[\\w+=,.@-]{1,64}$", var.member_lifecycle_role_name))
    error_message = "member_lifecycle_role_name: an IAM role name."
  }
}

variable "member_organization_id" {
  description = "The AWS Organizations id (o-...) of the member accounts: the functions may then assume member_role_name only in that organization's accounts (aws:ResourceOrgID); empty: in any account whose role trusts them."
  type        = string
  default     = ""
  validation {
    condition     = can(regex("^(o-[a-z0-9]{10,32})?$", var.member_organization_id))
    error_message = "member_organization_id: an organization id, o- and 10 to 32 lower-case letters or digits, or empty."
  }
}

variable "offline_after_seconds" {
  description = "Agent silence after which a workload leaves its peers' sets."
  type        = number
  default     = 900
}

variable "lifecycle_gate" {
  description = "When compute completes a launch lifecycle action: \"publish\" (perimeter attached, bundle published) or \"agent\" (also: the new instance's agent enforces). Give the hook DefaultResult ABANDON."
  type        = string
  default     = "publish"
  validation {
    condition     = contains(["publish", "agent"], var.lifecycle_gate)
    error_message = "lifecycle_gate must be publish or agent."
  }
}

variable "gated_group_names" {
  description = "Name pattern (IAM wildcards) of the Auto Scaling groups whose lifecycle actions compute may complete."
  type        = string
  default     = "*"
}

variable "lifecycle_hook_names" {
  description = "Names (exact) of the lifecycle hooks that are Ringfence's: the lifecycle rule passes only their actions, and the lifecycle and compute functions hold and complete no other's (another hook on a gated group, a bootstrap step or a log drain, is left to its owner). The default is the names docs/deploy-aws.md gives the launch and terminate hooks."
  type        = list(string)
  default     = ["ringfence-launch", "ringfence-terminate"]
  validation {
    condition     = length(var.lifecycle_hook_names) > 0 && alltrue([for n in var.lifecycle_hook_names : can(regex("^[A-Za-z0-9/_-]{1,255}$", n))])
    error_message = "lifecycle_hook_names: at least one lifecycle hook name (letters, digits, -, _, /; at most 255)."
  }
}

variable "enroll_methods" {
  description = "Enrollment methods the agent API accepts. EC2 agents send aws-iid; aws-sts (server side only), azure-attested, gcp-jwt (with var.azure / var.gcp) and pairing (on-premise hosts; keys go out of band, never in user data) are off unless listed."
  type        = list(string)
  default     = ["aws-iid"]
  validation {
    condition     = alltrue([for m in var.enroll_methods : contains(["aws-iid", "aws-sts", "azure-attested", "gcp-jwt", "pairing"], m)])
    error_message = "enroll_methods: each of aws-iid, aws-sts, azure-attested, gcp-jwt, pairing."
  }
}

variable "agent_token_ttl_seconds" {
  description = "Lifetime of an agent's access token; agents renew it before it ends with a signature by their key (over the current token while it is valid, over a nonce after)."
  type        = number
  default     = 3600
}

variable "agent_api_unauthenticated_requests_per_ip" {
  description = "Requests one IP address may make in 5 minutes to the agent API's routes that take no bearer token (GET /v1/nonce, POST /v1/enroll, POST /v1/agents/{id}/token without a bearer) before the agent API's web ACL blocks it (429; a WAF rate-based rule, evaluated per address; a renewal with a still-valid token is neither counted nor blocked); hosts behind one NAT share an address, so size it for the most hosts that enroll through one (an agent makes 2 such requests per enrollment or renewal of an expired token, none while its token is valid)."
  type        = number
  default     = 2000
  validation {
    condition     = var.agent_api_unauthenticated_requests_per_ip >= 10 && var.agent_api_unauthenticated_requests_per_ip <= 2000000000
    error_message = "agent_api_unauthenticated_requests_per_ip: 10 to 2,000,000,000 (WAF's rate-based limits)."
  }
}

variable "report_bytes_per_second" {
  description = "What one workload may send to the reports route, in bytes a second on average (ringfence serve's RINGFENCE_REPORT_BYTES_PER_SECOND); past its window's quota the route answers 429 with Retry-After."
  type        = number
  default     = 262144
  validation {
    condition     = var.report_bytes_per_second >= 1
    error_message = "report_bytes_per_second must be at least 1."
  }
}

variable "report_burst_bytes" {
  description = "The report bytes one workload may send in one window of report_burst_bytes / report_bytes_per_second seconds (ringfence serve's RINGFENCE_REPORT_BURST_BYTES)."
  type        = number
  default     = 33554432
  validation {
    # at least one whole batch (the route takes up to 256 KiB): a smaller window is let through
    # one batch of any size at its start, and would hold no limit over time
    condition     = var.report_burst_bytes >= 262144
    error_message = "report_burst_bytes must be at least 262144 (one report batch)."
  }
}

variable "sts_endpoints" {
  description = "aws-sts only: the STS origins the agent API replays to; empty = AWS's STS host names over https."
  type        = list(string)
  default     = []
}

variable "flow_log_bucket_name" {
  description = "An S3 bucket where VPC Flow Logs are delivered (with EventBridge notifications on); empty: flows from agents only."
  type        = string
  default     = ""
}

variable "flow_log_accounts" {
  description = "The accounts whose VPC Flow Logs in flow_log_bucket_name are read (12-digit ids, or [\"*\"] for any); empty: this deployment's own account. Set it where other accounts' VPCs deliver into the bucket."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for a in var.flow_log_accounts : can(regex("^([0-9]{12}|\\*)$", a))])
    error_message = "flow_log_accounts: 12-digit account ids, or \"*\" for any."
  }
}

variable "reconcile_schedule" {
  type    = string
  default = "rate(15 minutes)"
}

variable "audit_anchor_schedule" {
  description = "How often the anchor function copies the audit chain's head to the anchor bucket (docs/visibility.md): a rewrite of records newer than the last anchor is not caught."
  type        = string
  default     = "rate(1 hour)"
}

variable "audit_anchor_retention_days" {
  description = "Object Lock default retention (COMPLIANCE mode) of each anchored head: until then no one, the account's root included, can delete or overwrite it."
  type        = number
  default     = 365
  validation {
    condition     = var.audit_anchor_retention_days >= 1
    error_message = "audit_anchor_retention_days: at least 1."
  }
}

variable "perimeter_config" {
  description = "ringfence.perimeter.PerimeterConfig as an object (JSON-encoded into the function)."
  type        = any
  default     = {}
}

variable "perimeter_vpc_arns" {
  description = "VPCs whose interfaces and groups the perimeter function may change (ARNs, wildcards allowed); null: every VPC of this account and Region. Narrow it to the VPCs perimeter_config manages."
  type        = list(string)
  default     = null
}

variable "perimeter_dry_run" {
  type    = bool
  default = true
}

variable "siem_target" {
  description = "Where audit records, agents' drops and findings also go as OCSF 1.7.0 JSON: none, eventbridge (the module's <name>-siem bus) or cloudwatch (the log group /ringfence/<name>/siem)."
  type        = string
  default     = "none"
  validation {
    condition     = contains(["none", "eventbridge", "cloudwatch"], var.siem_target)
    error_message = "siem_target must be none, eventbridge or cloudwatch."
  }
}

variable "log_retention_days" {
  type    = number
  default = 365
}

variable "tags" {
  type    = map(string)
  default = {}
}

variable "admin_roles" {
  description = "IAM role/user ARN → its admin roles (policy-author, incident-responder, onboarding, reader). Only these principals may call the admin API (its resource policy); unbound callers are refused every action."
  type        = map(list(string))
  validation {
    condition     = length(var.admin_roles) > 0
    error_message = "admin_roles: name at least one admin principal (the admin API's resource policy allows only these)."
  }
  validation {
    condition     = alltrue([for roles in values(var.admin_roles) : alltrue([for r in roles : contains(["policy-author", "incident-responder", "onboarding", "reader"], r)])])
    error_message = "admin_roles: each role is one of policy-author, incident-responder, onboarding, reader."
  }
}

variable "gcp" {
  description = <<-EOT
    GCP events (docs/deploy-gcp.md): set it to deploy the gcpevents function and its POST /gcp/events
    API with the GCP dependency layer (layer_zip, arm64). null: no GCP.
  EOT
  type = object({
    layer_zip             = string
    projects              = string # PROJECT_ID=PROJECT_NUMBER,...
    events_audience       = string # the OIDC audience of push tokens: the /gcp/events URL
    push_service_accounts = string # whose push tokens are accepted
    tag_parents           = optional(string, "")
    label_source          = optional(string, "secure-tags")
    credentials           = optional(string, "") # workload identity federation config (no secret)
    identity_audience     = optional(string, "") # gcp-jwt on the agent API (enroll_methods lists it)
    # JSON GcpPerimeterConfig (env → secure tag value): the scheduled cloudreconcile converges an
    # rf-<network> firewall policy per VPC network from perimeter_config; "": inventory only
    perimeter = optional(string, "")
  })
  default = null
  validation {
    # secure tag keys under any parent would be trusted: a project owner can create one named like ours
    condition     = var.gcp == null ? true : ((var.gcp.label_source == "labels" && var.gcp.tag_parents == "") || can(regex("^(organizations|projects)/[0-9]+(, ?(organizations|projects)/[0-9]+)*$", var.gcp.tag_parents)))
    error_message = "gcp.tag_parents: organizations/ORGANIZATION_ID (or projects/NUMBER), comma-separated; required unless gcp.label_source is labels."
  }
}

variable "azure" {
  description = <<-EOT
    Azure events (docs/deploy-azure.md): set it to deploy the azureevents function and its
    POST /azure/events API with the Azure dependency layer (layer_zip, arm64), and to offer
    azure-attested enrollment on the agent API (when enroll_methods lists it). Secrets are given by
    Secrets Manager ARN, never by value. null: no Azure.
  EOT
  type = object({
    layer_zip              = string
    subscriptions          = string               # subscription ids governed, comma-separated
    eventgrid_secret_arn   = optional(string, "") # the x-ringfence-eventgrid-secret delivery header's value
    credentials_secret_arn = optional(string, "") # JSON {tenant_id, client_id, client_secret}
    eventgrid_tenant       = optional(string, "") # Entra ID tokens on deliveries ("": not checked)
    eventgrid_audience     = optional(string, "")
    attested_roots         = optional(string, "")  # PEM roots of the IMDS attested document's signer
    perimeter              = optional(bool, false) # cloudreconcile converges NSGs/ASGs from perimeter_config
  })
  default = null
  validation {
    condition     = var.azure == null || try(var.azure.eventgrid_secret_arn != "" || var.azure.eventgrid_audience != "", false)
    error_message = "azure: set eventgrid_secret_arn or eventgrid_tenant/eventgrid_audience: deliveries must be authenticated."
  }
}

# A member account listed for reads but not for the perimeter: the perimeter refuses its plans (its
# security groups are not managed and its launches' lifecycle actions time out into their default
# result). A warning, not an error: leaving a member's perimeter unmanaged may be deliberate.
check "member_accounts_have_a_perimeter_role" {
  assert {
    condition     = length(setsubtract(keys(var.account_roles), keys(var.perimeter_account_roles))) == 0
    error_message = "account_roles lists accounts without a perimeter role in perimeter_account_roles: ${join(", ", setsubtract(keys(var.account_roles), keys(var.perimeter_account_roles)))}. Their perimeters are not managed and their launch lifecycle actions time out."
  }
}

check "perimeter_writes_name_their_vpcs" {
  assert {
    condition     = var.perimeter_dry_run || var.perimeter_vpc_arns != null
    error_message = "perimeter_dry_run is false and perimeter_vpc_arns is null: ec2:ModifyNetworkInterfaceAttribute cannot carry a tag condition, so the perimeter role may put any security group (a foreign one included) on any interface of every VPC of this account and Region. Name the VPCs the perimeter manages."
  }
}
