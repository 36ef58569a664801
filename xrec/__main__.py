from xrec.cli import main

main()
