"""Code that both sides of edgefleet use: the device agent and the fleet service.

How the pieces fit:

- ``container``  — the strict one-file transport (a USTAR subset) and its streaming reader.
- ``manifest``   — the typed, validated description of a model and its files.
- ``bundle``     — build a bundle from a model directory; read, check and extract one.
- ``trust``      — TUF/Uptane signing and verification of releases (python-tuf).
- ``keystore``   — the on-disk layout of a signer's keys and repository state.
- ``errors``     — the one error tree every module raises from.

The pure modules (``container``, ``manifest``, ``durations``, ``jsonsafe``) do no network or
runtime I/O; the agent, the fleet and the simulators all reuse them.
"""
