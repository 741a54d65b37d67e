"""The front-ends, which decide which snapshot to probe and when: the in-training monitor, ``memwatch probe`` /
``watch`` over checkpoint folders, ``memwatch score`` on finished samples, and ``memwatch canaries``."""
