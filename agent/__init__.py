"""The device agent: it runs on each edge device, reports the hardware and runtimes it has, and
fetches, verifies and runs the model bundles the fleet assigns to it."""
