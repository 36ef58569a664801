"""The stream contract and the Faust worker of xrec.

Topic names, pydantic records, platform adapters (declared in config files), the
normalize / recommend core, the Redis state store and the Faust app that wires them.
"""
