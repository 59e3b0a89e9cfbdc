"""Developer tooling shipped with the package: a throwaway local Synapse for tests and demos."""
