"""Secure deployments: a federation's CA, certificates or passwords, ACL and broker config."""

from healthnet.deploy.acl import PERMISSIONS, SERVICE_IDENTITIES, Access, Grant, Role, Scope
from healthnet.deploy.generate import (
    AuthMode,
    BrokerLimits,
    Deployment,
    DeploymentSpec,
    generate_deployment,
    read_env_file,
)
from healthnet.deploy.regions import Region

__all__ = [
    "PERMISSIONS",
    "SERVICE_IDENTITIES",
    "Access",
    "AuthMode",
    "BrokerLimits",
    "Deployment",
    "DeploymentSpec",
    "Grant",
    "Region",
    "Role",
    "Scope",
    "generate_deployment",
    "read_env_file",
]
