"""Developer tooling shipped with the package, never used by `civic-bridge run`: a
throwaway local Synapse (`synapse`), the WhatsApp Cloud API simulator, as strict as Meta
(`simulator`), and the local demo (`demo*`)."""
