"""moefast native CPU kernels (sparse embedding engine)."""



def core_build_info() -> str:
    """
    How the hot static library was compiled, e.g. 'opt=-O3;optimize=speed;...'.
    """
