from weatherkd.cli import entry

# The guard matters: loader workers start from a forkserver, which re-imports __main__.
if __name__ == "__main__":
    entry()
