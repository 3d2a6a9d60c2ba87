"""Our objectives inside other training engines; `selfdistill.integrations.trl`: TRL (extra `selfdistill[trl]`)."""
