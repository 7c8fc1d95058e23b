"""The protocol-neutral mapping core: model, lifecycle, store, policy, service (docs/core.md)."""
