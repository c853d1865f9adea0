"""How edits are judged: CounterFact/zsRE metrics and causal tracing."""
