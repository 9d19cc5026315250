"""The fleet service: it registers devices, plans gated staged rollouts and talks to devices over
MQTT.

- ``broker_config`` — the Mosquitto configuration and ACL every deployment runs (mTLS identities,
  per-device topic confinement, packet size limit); pure text, written once by the deployer.
"""
