"""AWS adapters: EC2 describe, S3 publishing, signing keys, enrollment, security groups, services."""
