"""The single-file worker's entry point: `emp-worker` (emp_worker.cli)."""

from emp_worker.cli import main

if __name__ == "__main__":
    main()
