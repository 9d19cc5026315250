"""What the device can run on: its hardware inventory and the ML runtime backends."""
