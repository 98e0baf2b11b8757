"""`python -m lib.teacher reset-spending --run R`: forget a run's teacher spending (`make budget-reset`)."""
import argparse

from lib.teacher import reset_spending

parser = argparse.ArgumentParser(description="The teacher cache: reset a run's spending (`make budget-reset`).")
parser.add_argument("command", choices=["reset-spending"])
parser.add_argument("--run", required=True, help="the run folder name, e.g. dnd-default")
parser.add_argument("--cache-root", default="", help="where the teacher cache lives (CACHE=…); empty: data/cache")
args = parser.parse_args()
print(f"run {args.run}: spending of {reset_spending(args.run, args.cache_root):,} tokens forgotten; its budget starts at 0")
