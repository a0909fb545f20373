"""What the tests and bench/bad_inputs.py build and run: tiny random-weight CLIPs, small datasets and synthetic
features files on disk (fixtures), and the registry of bad inputs with what each must get (bad_inputs)."""
