"""Graph data, GNN teachers and GNN-to-MLP distillation (installed as ``mmkd.graphs``)."""
