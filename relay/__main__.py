from relay.cli import run

run()
