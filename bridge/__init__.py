"""civic-bridge: agency-controlled E2EE Matrix rooms and opt-in WhatsApp mirroring."""

__version__ = "0.1.0"
