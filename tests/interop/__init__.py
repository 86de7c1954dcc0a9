"""Other stacks reading our files: scripts run in their own environments, and the helpers that call them."""
