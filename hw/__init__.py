"""bct.hw: the Amaranth RTL units and the encoder-layer accelerator.

:data:`REPLICA_ATTR` names the attribute carried by deliberate register copies (fan-out
replicas of one control flag, each driving one processing element). Their inputs are equal, so
a synthesis tool would merge them back into one high-fan-out register; ``bct synth`` marks the
flip-flops driving a wire with this attribute ``keep`` before synthesis.
"""

#: Attribute of register copies that synthesis must not merge (see the module docstring).
REPLICA_ATTR = "bct_replica"
