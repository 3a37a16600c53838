"""The whole pipeline: the stage table and keys (`stages`), the plain chain (`chain`), the ablation
study, the `retroflow` command line, run reports, and the Prefect flows and deployments. The only
package that imports Prefect; the chain and the CLI run the same steps without it."""
