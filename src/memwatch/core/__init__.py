"""The probing core: a session that probes a snapshot with the configured probes and records it (session, recording,
outputs, run state), the probe API and registry, config and cadence, and how work is shared between processes."""
