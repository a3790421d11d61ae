# sirl_find_nvcc(): leaves CMAKE_CUDA_COMPILER set where an nvcc can be had, looking
#   1. where CMake's check_language(CUDA) looks: CMAKE_CUDA_COMPILER, $CUDACXX, PATH;
#   2. in /usr/local/cuda/bin;
#   3. in NVIDIA's compiler wheels (nvidia-cuda-nvcc and the rest of SIRL_CUDA_PIP_PACKAGES in pyproject.toml)
#      installed into the Python that runs the build: the isolated build environment of `pip install .` when
#      SIRL_KERNELS_CUDA_FROM_PIP=1 adds them, or a --target folder on CMAKE_PREFIX_PATH (scripts/build_csrc.sh).
# Where the compiler comes from a wheel, the toolkit root (cudart_static, headers) is the folder above its bin/.
macro(sirl_find_nvcc)
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc CACHE FILEPATH "CUDA compiler" FORCE)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  if(NOT CMAKE_CUDA_COMPILER)
    set(_sirl_nvcc_roots ${CMAKE_PREFIX_PATH})
    find_package(Python COMPONENTS Interpreter QUIET)
    if(Python_EXECUTABLE)
      execute_process(
        COMMAND "${Python_EXECUTABLE}" -c "import nvidia; print(';'.join(nvidia.__path__))"
        OUTPUT_VARIABLE _sirl_nvidia_dirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _sirl_rc)
      if(_sirl_rc EQUAL 0)
        list(APPEND _sirl_nvcc_roots ${_sirl_nvidia_dirs})
      endif()
    endif()
    foreach(_sirl_root IN LISTS _sirl_nvcc_roots)
      file(GLOB_RECURSE _sirl_found LIST_DIRECTORIES false "${_sirl_root}/*/bin/nvcc")
      if(_sirl_found)
        list(GET _sirl_found 0 _sirl_nvcc)
        get_filename_component(_sirl_bin "${_sirl_nvcc}" DIRECTORY)
        get_filename_component(_sirl_toolkit "${_sirl_bin}" DIRECTORY)
        # check_language(CUDA) left a NOTFOUND both in the cache and in this scope: replace both.
        set(CMAKE_CUDA_COMPILER "${_sirl_nvcc}" CACHE FILEPATH "CUDA compiler" FORCE)
        set(CMAKE_CUDA_COMPILER "${_sirl_nvcc}")
        set(CUDAToolkit_ROOT "${_sirl_toolkit}" CACHE PATH "CUDA toolkit root" FORCE)
        message(STATUS "sirl-kernels: nvcc from NVIDIA's wheels: ${_sirl_nvcc}")
        break()
      endif()
    endforeach()
  endif()
  # NVIDIA's wheels put the runtime libraries in lib/, where their nvcc.profile looks in lib64/: tell nvcc, or even
  # CMake's first test link of a CUDA program fails (cannot find -lcudart_static).
  if(CMAKE_CUDA_COMPILER)
    get_filename_component(_sirl_root "${CMAKE_CUDA_COMPILER}" DIRECTORY)
    get_filename_component(_sirl_root "${_sirl_root}" DIRECTORY)
    if(NOT EXISTS "${_sirl_root}/lib64" AND EXISTS "${_sirl_root}/lib/libcudart_static.a")
      set(CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS} -L${_sirl_root}/lib")
    endif()
  endif()
endmacro()
