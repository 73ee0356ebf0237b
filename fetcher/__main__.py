from fetcher.cli import run

run()
