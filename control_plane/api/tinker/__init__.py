"""The Tinker service API under ``/api/v1`` (the contract is the official ``tinker`` SDK)."""
