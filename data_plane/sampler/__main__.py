from data_plane.sampler.launch import main

if __name__ == "__main__":
    main()
