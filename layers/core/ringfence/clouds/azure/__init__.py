"""The Azure adapters and services, on the cloud-neutral :mod:`ringfence.control` (docs/deploy-azure.md).

=================  ==========================================================================
``arm``            the ARM clients (azure-mgmt-compute, azure-mgmt-network) per subscription;
                   every ARM call goes through it, so tests run against the local ARM server
``model``          VMs and NICs apart from ARM's wire format → inventory records
``inventory``      a subscription's VMs, scale sets' VMs and NICs → governed records
``events``         Event Grid deliveries → changes (no I/O)
``ingest``         the delivery endpoint: handshake, secret, changes read back and stored
``attested``       the IMDS attested document (PKCS7) verified
``enroll``         the ``azure-attested`` enroller
``perimeter``      ASGs and one NSG per VNet and environment from the neutral plan
``wiring``         :class:`~ringfence.clouds.azure.wiring.AzureConfig` (environment) → ARM clients
=================  ==========================================================================
"""
