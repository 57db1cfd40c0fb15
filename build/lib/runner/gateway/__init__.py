"""Host-side network services reached from the sandbox only through unix sockets."""

from runner.gateway.backends import PLACEHOLDER_KEY
from runner.gateway.credentials import CredentialError
from runner.gateway.record import ReplayError
from runner.gateway.service import ProviderGateway

__all__ = ["PLACEHOLDER_KEY", "CredentialError", "ProviderGateway", "ReplayError"]
