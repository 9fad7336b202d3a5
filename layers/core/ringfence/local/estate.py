"""The sample estate of ``examples/ordering`` created in an embedded AWS (moto): VPCs, subnets,
tagged instances at the example's addresses, and an Auto Scaling group for the ordering web tier
with a launch lifecycle hook.

Workload ids in AWS are instance ids; the example's names become ``Name`` tags, and the
example's policy tests, which name workloads, are rewritten to the instance ids.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ringfence.inventory import load_inventory
from ringfence.model import Workload

ASG_NAME = "ord-prod-web-asg"
HOOK_NAME = "ringfence-launch"  # the name docs/deploy-aws.md gives (LifecycleHookNames' default)
ASG_SUBNET = "10.1.16.0/20"  # the web ASG's subnet: moto picks addresses in it
ASG_TAGS = {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod"}
# the IAM role that tags the estate: the example policy's ``labels.taggers`` names it, so its
# CloudTrail-attributed tag changes may set privileged values (role jumpbox, app admin)
TAGGER_ROLE = "ringfence-tagging"
HOOK_TIMEOUT = 600  # seconds a launch waits in Pending:Wait for its agent (AWS default: 3600)


@dataclass
class Estate:
    vpcs: dict[str, str] = field(default_factory=dict)  # /16 → vpc id
    subnets: dict[str, str] = field(default_factory=dict)  # /24 (or the ASG's /20) → subnet id
    instances: dict[str, str] = field(default_factory=dict)  # example name → instance id
    ips: dict[str, str] = field(default_factory=dict)  # example name → private IPv4
    asg: str = ASG_NAME
    hook: str = HOOK_NAME

    def name_of(self, instance_id: str) -> str:
        return next((n for n, i in self.instances.items() if i == instance_id), instance_id)


def example_workloads(example: Path, names: Iterable[str] | None = None) -> list[Workload]:
    wanted = set(names) if names is not None else None
    return [w for w in load_inventory(example / "inventory.yaml") if wanted is None or w.id in wanted]


LAB_IMAGE = "ringfence-lab"  # the machine image the lab's instances launch from


def lab_image(ec2: Any) -> str:
    """The id of the lab's machine image in ``ec2``'s region, registered on first use (the
    embedded moto loads no public catalog: ``motoproc``)."""
    mine = ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [LAB_IMAGE]}])["Images"]
    if mine:
        return str(mine[0]["ImageId"])
    return str(ec2.register_image(Name=LAB_IMAGE, Description="Ringfence lab instances")["ImageId"])


def build_estate(ec2: Any, autoscaling: Any, workloads: list[Workload], region: str) -> Estate:
    """Create the VPCs, subnets and instances (running, with the example's tags and IPv4
    address, plus ``Name``), the web tier's launch template, ASG (0 instances) and its hook.
    ``ec2`` should call as :data:`TAGGER_ROLE` (``EmbeddedAws.client_as``): the instances' label
    tags are then set by the allowed tagger, as the guard rail in the deploy guide requires."""
    est = Estate()
    ami = lab_image(ec2)
    zone = f"{region}a"

    def subnet_for(ip: str, cidr: str | None = None) -> str:
        net = cidr or str(ipaddress.ip_network(f"{ip}/24", strict=False))
        if net not in est.subnets:
            vpc_net = str(ipaddress.ip_network(net).supernet(new_prefix=16))
            if vpc_net not in est.vpcs:
                est.vpcs[vpc_net] = ec2.create_vpc(CidrBlock=vpc_net)["Vpc"]["VpcId"]
            est.subnets[net] = ec2.create_subnet(VpcId=est.vpcs[vpc_net], CidrBlock=net, AvailabilityZone=zone)[
                "Subnet"
            ]["SubnetId"]
        return est.subnets[net]

    for w in workloads:
        ip = next(a for a in w.ips if ":" not in a)  # IPv4 only in the lab
        tags = {**w.tags, "Name": w.id}
        out = ec2.run_instances(
            ImageId=ami,
            MinCount=1,
            MaxCount=1,
            InstanceType="t3.micro",
            SubnetId=subnet_for(ip),
            PrivateIpAddress=ip,
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in sorted(tags.items())]}
            ],
        )
        est.instances[w.id] = out["Instances"][0]["InstanceId"]
        est.ips[w.id] = ip
    asg_subnet = subnet_for("", ASG_SUBNET)
    lt = ec2.create_launch_template(
        LaunchTemplateName=f"{ASG_NAME}-lt", LaunchTemplateData={"ImageId": ami, "InstanceType": "t3.micro"}
    )["LaunchTemplate"]["LaunchTemplateId"]
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=ASG_NAME,
        LaunchTemplate={"LaunchTemplateId": lt, "Version": "$Latest"},
        MinSize=0,
        MaxSize=100,
        DesiredCapacity=0,
        VPCZoneIdentifier=asg_subnet,
        Tags=[
            {
                "Key": k,
                "Value": v,
                "PropagateAtLaunch": True,
                "ResourceId": ASG_NAME,
                "ResourceType": "auto-scaling-group",
            }
            for k, v in ASG_TAGS.items()
        ],
    )
    autoscaling.put_lifecycle_hook(
        LifecycleHookName=HOOK_NAME,
        AutoScalingGroupName=ASG_NAME,
        LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
        HeartbeatTimeout=HOOK_TIMEOUT,
        DefaultResult="ABANDON",  # not segmented in time: never serve traffic
    )
    return est


def policy_files(example: Path, est: Estate) -> dict[str, str]:
    """The example's policy files, its tests naming workloads by instance id (AWS's workload id).
    Tests naming a workload the estate does not hold are dropped: provisioning refuses a test it
    cannot run."""
    files = {p.name: p.read_text() for p in sorted((example / "policy").glob("*.yaml"))}
    if "tests.yaml" in files:
        files["tests.yaml"] = _rewrite_tests(files["tests.yaml"], est.instances)
    return files


def _rewrite_tests(text: str, ids: dict[str, str]) -> str:
    import yaml

    doc = yaml.safe_load(text) or {}
    kept = []
    for t in doc.get("tests", []):
        ok = True
        for side in ("from", "to"):
            ref = t.get(side, {})
            if isinstance(ref, dict) and "workload" in ref:
                if ref["workload"] not in ids:
                    ok = False
                else:
                    ref["workload"] = ids[ref["workload"]]
        if ok:
            kept.append(t)
    return str(yaml.safe_dump({"tests": kept}, sort_keys=False))
