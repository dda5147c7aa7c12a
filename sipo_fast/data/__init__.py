"""Preference data: the shipped demo set, loaders for PKU-SafeRLHF and HelpSteer, formatting."""
