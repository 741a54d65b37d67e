"""Signed attestations of audit reports, and their verification (``memwatch report --sign``, ``memwatch keygen``,
``memwatch verify``).

A report is attested as the supply-chain world attests artefacts: an in-toto Statement v1 whose subjects are the
audited weights, the data manifests and the report files, with a memwatch predicate (verdicts, onset and last
clean steps, the store's chain head), serialised as RFC 8785 canonical JSON and signed with Ed25519 in a DSSE
envelope. Nothing needs the network. ``docs/audit.md`` describes the predicate and what a verification checks.
"""
