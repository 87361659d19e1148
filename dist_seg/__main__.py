from dist_seg.cli import main

main()
