"""Model servers and tool runners behind one interface (`Backend`), one file each.

torch.py and the openai client are imported only when a node serves such a replica, so a CPU tool
host never pays for torch.
"""
